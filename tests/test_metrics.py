"""dcml.metrics against hand examples and a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dcml import faiss_backend, metrics
from dcml.clustering import kmeans

# ---------------------------------------------------------------- reference


def brute_force_order(queries: np.ndarray, gallery: np.ndarray, exclude_self: bool) -> np.ndarray:
    """(n, m) gallery indices by ascending float64 distance (self removed when asked)."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    distances = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")
    return order[:, :-1] if exclude_self else order


def reference_metrics(order, query_labels, gallery_labels, relevant, ks) -> dict[str, float]:
    matches = gallery_labels[order] == query_labels[:, None]
    out = {f"recall@{k}": float(matches[:, :k].any(1).mean()) for k in ks}
    aps, rps = [], []
    for row, r in zip(matches, relevant, strict=True):
        if r == 0:
            continue
        rel = row[:r]
        precision = np.cumsum(rel) / np.arange(1, r + 1)
        aps.append((precision * rel).sum() / r)
        rps.append(rel.sum() / r)
    out["map@r"], out["r_precision"] = float(np.mean(aps)), float(np.mean(rps))
    return out


def well_separated_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous random points whose pairwise distances differ by far more than float32 error."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, size=(n, 4)).astype(np.float32)
    labels = rng.integers(0, n // 6, size=n)
    d = np.sort(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1), axis=1)
    assert np.diff(d[:, 1:], axis=1).min() > 1e-4, "pick another seed: near-tied distances"
    return x, labels


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return well_separated_data(120, seed=4)


# ---------------------------------------------------------------- kNN


def test_knn_matches_brute_force(data):
    x, _ = data
    distances, indices = metrics.knn(x, x, 10, exclude_self=True)
    order = brute_force_order(x, x, exclude_self=True)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    np.testing.assert_array_equal(indices, order[:, :10])
    expected = ((x[:, None] - x[indices]) ** 2).sum(-1)  # squared L2
    np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-4)


def test_knn_query_gallery_matches_brute_force(data):
    x, _ = data
    _, indices = metrics.knn(x[:30], x[30:], 5, chunk_size=4)
    np.testing.assert_array_equal(indices, brute_force_order(x[:30], x[30:], False)[:, :5])


def test_knn_exclude_self_with_duplicates():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((10, 3)).astype(np.float32)
    x = np.concatenate([base, base, base])  # every point has two exact duplicates
    _, indices = metrics.knn(x, x, 2, exclude_self=True)
    assert indices.shape == (30, 2)
    assert not (indices == np.arange(30)[:, None]).any()
    np.testing.assert_array_equal(np.sort(indices % 10, axis=1), np.tile(np.arange(10), 3)[:, None] * [1, 1])


def test_knn_chunking_is_invisible(data):
    x, _ = data
    small = metrics.knn(x, x, 9, exclude_self=True, chunk_size=7)
    large = metrics.knn(x, x, 9, exclude_self=True, chunk_size=100_000)
    np.testing.assert_array_equal(small[1], large[1])
    np.testing.assert_allclose(small[0], large[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [0, 120])
def test_knn_rejects_k_out_of_range(data, k):
    x, _ = data
    with pytest.raises(ValueError, match="k="):
        metrics.knn(x, x, k, exclude_self=True)


# ---------------------------------------------------------------- recall / MAP@R


def test_recall_five_point_hand_example():
    # first same-label neighbour ranks: 0, 0, 2, 1, 2 -> R@1 = 2/5, R@2 = 3/5, R@3 = 1
    x = np.array([[0.0], [1.0], [3.0], [7.0], [8.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 0])
    assert metrics.recall_at_k(x, labels, [1, 2, 3, 4]) == {1: 0.4, 2: 0.6, 3: 1.0, 4: 1.0}


def test_map_at_r_excludes_the_query_from_r():
    # A = {0, 1, 10}, B = {2.5, 11}. With R = other items of the class the APs are
    # 1/2, 1/2, 0, 0, 0 -> 0.2; counting the query in R would give a different value.
    x = np.array([[0.0], [1.0], [10.0], [2.5], [11.0]], dtype=np.float32)
    labels = np.array(["A", "A", "A", "B", "B"])
    assert metrics.map_at_r(x, labels) == pytest.approx(0.2)
    assert metrics.r_precision(x, labels) == pytest.approx(0.2)
    off_by_one = (5 / 9 + 5 / 9 + 1 / 9 + 0 + 1 / 4) / 5
    assert abs(off_by_one - 0.2) > 0.05


def test_map_skips_queries_without_other_items():
    x = np.array([[0.0], [1.0], [5.0]], dtype=np.float32)
    assert metrics.map_at_r(x, np.array([0, 0, 1])) == 1.0  # the singleton class 1 is skipped
    assert np.isnan(metrics.map_at_r(x, np.array([0, 1, 2])))


@pytest.mark.parametrize("chunk_size", [7, 8192])
def test_evaluate_retrieval_matches_brute_force(data, chunk_size):
    x, labels = data
    ks = [1, 2, 5, 17, len(x) - 1]
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    expected = reference_metrics(brute_force_order(x, x, True), labels, labels, counts[codes] - 1, ks)
    got = metrics.evaluate_retrieval(x, labels, ks, with_nmi=False, chunk_size=chunk_size)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert metrics.recall_at_k(x, labels, ks) == {k: got[f"recall@{k}"] for k in ks}
    assert metrics.map_at_r(x, labels) == pytest.approx(expected["map@r"])
    assert metrics.r_precision(x, labels) == pytest.approx(expected["r_precision"])


@pytest.mark.parametrize("chunk_size", [7, 8192])
def test_query_gallery_matches_brute_force(data, chunk_size):
    x, labels = data
    query, gallery = x[:40], x[40:]
    query_labels, gallery_labels = labels[:40].copy(), labels[40:]
    query_labels[0] = -5  # a query whose label is absent from the gallery: R = 0, recall miss
    ks = [1, 3, 10, len(gallery)]
    relevant = (gallery_labels[None, :] == query_labels[:, None]).sum(1)
    expected = reference_metrics(brute_force_order(query, gallery, False), query_labels, gallery_labels, relevant, ks)
    got = metrics.evaluate_query_gallery(query, query_labels, gallery, gallery_labels, ks, chunk_size=chunk_size)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    recalls = metrics.recall_at_k_query_gallery(query, query_labels, gallery, gallery_labels, ks)
    assert recalls == {k: got[f"recall@{k}"] for k in ks}


def test_recall_rejects_k_too_large(data):
    x, labels = data
    with pytest.raises(ValueError, match="n - 1"):
        metrics.recall_at_k(x, labels, [1, len(x)])
    with pytest.raises(ValueError, match="gallery size"):
        metrics.recall_at_k_query_gallery(x[:5], labels[:5], x[5:10], labels[5:10], [6])


# ---------------------------------------------------------------- NMI


def test_nmi_equals_sklearn_on_the_same_kmeans(data):
    x, labels = data
    num_classes = len(np.unique(labels))
    for method in ("arithmetic", "geometric"):
        expected = normalized_mutual_info_score(labels, kmeans(x, num_classes, seed=4), average_method=method)
        assert metrics.nmi(x, labels, seed=4, average_method=method) == pytest.approx(expected)


def test_nmi_is_one_on_separated_blobs():
    # single-restart k-means can merge blobs for an unlucky seed; seed 0 recovers these
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 40)
    x = (rng.standard_normal((160, 8)) * 0.05 + rng.standard_normal((4, 8))[labels] * 10).astype(np.float32)
    assert metrics.nmi(x, labels, seed=0) == pytest.approx(1.0)
    out = metrics.evaluate_retrieval(x, labels, [1], nmi_seed=0)
    assert out["nmi"] == pytest.approx(1.0) and out["recall@1"] == 1.0 and out["map@r"] == 1.0


# ---------------------------------------------------------------- backend


def test_faiss_backend_cpu_choice():
    assert isinstance(faiss_backend.gpu_available(), bool)
    assert faiss_backend.resolve_use_gpu(False) is False
    assert faiss_backend.resolve_use_gpu(None) == faiss_backend.gpu_available()
    if not faiss_backend.gpu_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            faiss_backend.resolve_use_gpu(True)
