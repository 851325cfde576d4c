"""dcml.clustering: k-means pass-through, Hungarian matching, trainability guards."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dcml import clustering


def blobs(num_blobs: int, per_blob: int = 40, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(num_blobs), per_blob)
    centres = rng.standard_normal((num_blobs, 8)) * 10
    x = rng.standard_normal((len(truth), 8)) * 0.05 + centres[truth]
    return x.astype(np.float32), truth


# ---------------------------------------------------------------- k-means


def test_kmeans_recovers_blobs():
    x, truth = blobs(4)
    for seed in range(3):
        assignment = clustering.kmeans(x, 4, nredo=10, seed=seed)
        assert assignment.dtype == np.int64 and assignment.shape == (160,)
        assert normalized_mutual_info_score(truth, assignment) == pytest.approx(1.0)


def test_kmeans_seed_is_deterministic_and_matters():
    x = np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32)
    first = clustering.kmeans(x, 10, seed=7)
    np.testing.assert_array_equal(first, clustering.kmeans(x, 10, seed=7))
    assert any(not np.array_equal(first, clustering.kmeans(x, 10, seed=s)) for s in range(8, 12))


def test_kmeans_nredo_is_honoured():
    # On these blobs a single restart from seed 1 merges two blobs; 10 restarts keep the best.
    x, truth = blobs(4)
    single = normalized_mutual_info_score(truth, clustering.kmeans(x, 4, nredo=1, seed=1))
    redone = normalized_mutual_info_score(truth, clustering.kmeans(x, 4, nredo=10, seed=1))
    assert single < 0.99 and redone == pytest.approx(1.0)


def test_build_kmeans_carries_every_parameter():
    model = clustering.build_kmeans(8, 5, niter=7, nredo=3, seed=11, max_points_per_centroid=17, use_gpu=False)
    assert (model.cp.niter, model.cp.nredo, model.cp.seed) == (7, 3, 11)
    assert model.cp.max_points_per_centroid == 17 and not model.cp.verbose


def test_kmeans_passes_parameters_to_build_kmeans(monkeypatch):
    seen = {}
    real = clustering.build_kmeans

    def spy(dim, k, **kwargs):
        seen.update(kwargs, dim=dim, k=k)
        return real(dim, k, **kwargs)

    monkeypatch.setattr(clustering, "build_kmeans", spy)
    x, _ = blobs(3)
    clustering.kmeans(x, 3, niter=5, nredo=2, seed=9, max_points_per_centroid=50, use_gpu=False)
    assert seen == dict(dim=8, k=3, niter=5, nredo=2, seed=9, max_points_per_centroid=50, use_gpu=False)


def test_kmeans_objective_with_more_redos_is_not_worse():
    x = np.random.default_rng(2).standard_normal((400, 4)).astype(np.float32)
    objectives = {}
    for nredo in (1, 5):
        model = clustering.build_kmeans(4, 12, nredo=nredo, seed=3, use_gpu=False)
        objectives[nredo] = model.train(x)
    assert objectives[5] <= objectives[1]


def test_kmeans_edge_cases():
    x, _ = blobs(2, per_blob=3)
    np.testing.assert_array_equal(clustering.kmeans(x, 1), np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="k must be"):
        clustering.kmeans(x, 7)
    assert sorted(clustering.kmeans(x, 6)) == list(range(6))


def test_kmeans_seed_derivation():
    seeds = {clustering.kmeans_seed(5, i) for i in range(100)}
    assert len(seeds) == 100 and clustering.kmeans_seed(5, 3) == 5003
    assert 0 <= clustering.kmeans_seed(10**9, 999) < 2**31
    assert clustering.kmeans_seed(5, 3) == clustering.kmeans_seed(5, 3)


# ---------------------------------------------------------------- Hungarian matching


def test_match_clusters_undoes_a_three_cycle():
    previous = np.repeat(np.arange(3), 5)
    np.testing.assert_array_equal(clustering.match_clusters(previous, (previous + 1) % 3), previous)


def test_match_clusters_undoes_a_random_permutation():
    rng = np.random.default_rng(0)
    previous = rng.integers(0, 8, size=200)
    permutation = rng.permutation(8)
    matched = clustering.match_clusters(previous, permutation[previous])
    assert matched.dtype == np.int64
    np.testing.assert_array_equal(matched, previous)


def test_match_clusters_partial_overlap_keeps_largest_overlap():
    previous = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    current = np.array([1, 1, 1, 0, 0, 0, 0, 1])  # new 1 is mostly old 0, new 0 mostly old 1
    np.testing.assert_array_equal(clustering.match_clusters(previous, current), [0, 0, 0, 1, 1, 1, 1, 0])


def test_match_clusters_ignores_excluded_previous_entries():
    previous = np.array([0, 0, 1, 1, -1, -1, -1, -1, -1])
    current = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0])  # the -1 block alone would pull new 0 to old 0
    np.testing.assert_array_equal(clustering.match_clusters(previous, current), [0, 0, 1, 1, 1, 1, 1, 1, 1])


def test_match_clusters_requires_the_same_number_of_clusters():
    with pytest.raises(ValueError, match="clusters"):
        clustering.match_clusters(np.array([0, 1, 2]), np.array([0, 1, 1]))
    # an empty cluster is fine once K is stated
    matched = clustering.match_clusters(np.array([0, 1, 2]), np.array([1, 0, 0]), num_clusters=3)
    np.testing.assert_array_equal(matched, [0, 1, 1])


# ---------------------------------------------------------------- trainability


def test_drop_singleton_images():
    assignment = np.array([0, 0, 0, 1, 1, 1, -1])
    labels = np.array([7, 7, 8, 7, 8, 8, 8])
    keep, dropped = clustering.drop_singleton_images(assignment, labels)
    np.testing.assert_array_equal(keep, [True, True, False, False, True, True, False])
    assert dropped == 2


def test_ensure_trainable_feeds_a_starving_cluster():
    # cluster 0: classes a, b, c (trainable, c biggest); cluster 1: only class d (trainable) + one e
    labels = np.array(list("aabbccc") + list("dde"))
    assignment = np.array([0] * 7 + [1] * 3)
    keep, _ = clustering.drop_singleton_images(assignment, labels)
    fixed = clustering.ensure_trainable(assignment, labels, keep, num_clusters=2)
    np.testing.assert_array_equal(fixed, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])  # class c moved whole
    assert fixed.dtype == np.int64


def test_ensure_trainable_fills_an_empty_cluster_and_leaves_good_ones_alone():
    labels = np.array(list("aabbccdd"))
    assignment = np.zeros(8, dtype=np.int64)
    keep, _ = clustering.drop_singleton_images(assignment, labels)
    fixed = clustering.ensure_trainable(assignment, labels, keep, num_clusters=2)
    for cluster in (0, 1):
        _, counts = np.unique(labels[fixed == cluster], return_counts=True)
        assert (counts >= 2).sum() >= 2
    np.testing.assert_array_equal(clustering.ensure_trainable(fixed, labels, keep, num_clusters=2), fixed)


def test_ensure_trainable_impossible_raises():
    labels = np.array(list("aabbc"))
    assignment = np.array([0, 0, 1, 1, 1])
    keep, _ = clustering.drop_singleton_images(assignment, labels)
    with pytest.raises(ValueError, match="too large"):
        clustering.ensure_trainable(assignment, labels, keep, num_clusters=2)


# ---------------------------------------------------------------- statistics


def test_cluster_stats():
    balanced = clustering.cluster_stats(np.array([0, 1, 2, 0, 1, 2, -1]), 3)
    assert balanced == {"size_min": 2, "size_max": 2, "size_entropy": pytest.approx(1.0)}
    skewed = clustering.cluster_stats(np.array([0, 0, 0, 0]), 2)
    assert skewed["size_min"] == 0 and skewed["size_entropy"] == pytest.approx(0.0)


def test_assignment_nmi():
    previous = np.array([0, 0, 1, 1, -1])
    assert clustering.assignment_nmi(previous, np.array([1, 1, 0, 0, 0])) == pytest.approx(1.0)
