"""One division step: k-means on the training embeddings, learner matching, guards.

Combines the primitives of :mod:`dcml.clustering` in the order the method needs them:
cluster → keep each learner on its previous data (Hungarian) → make sure every learner
has trainable data → drop images alone with their class in a cluster (counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dcml import clustering
from dcml.config import ClusterConfig
from dcml.faiss_backend import normalized_rows


@dataclass(frozen=True)
class Division:
    """The data of each learner until the next division.

    ``assignment[i]`` is the learner (cluster) of training image ``i``; ``keep[i]`` is
    False for images that cannot form a positive pair in their cluster.
    """

    assignment: np.ndarray  # (n,) int64 in 0..K-1
    keep: np.ndarray  # (n,) bool
    num_clusters: int
    num_dropped: int
    stats: dict[str, float]


def all_data(num_images: int) -> Division:
    """The trivial division (K=1): every image with the single learner."""
    assignment = np.zeros(num_images, dtype=np.int64)
    stats = clustering.cluster_stats(assignment, 1)
    return Division(assignment, np.ones(num_images, dtype=bool), 1, 0, stats)


def divide(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    config: ClusterConfig,
    *,
    seed: int,
    previous: np.ndarray | None = None,
    use_gpu: bool | None = None,
) -> Division:
    """Cluster ``embeddings`` (n, D) float32 into ``num_clusters`` learners' data.

    ``seed`` should differ per division (see :func:`dcml.clustering.kmeans_seed`);
    ``previous`` (n,) is the last assignment, matched so learners keep their data.
    """
    assignment = _kmeans(embeddings, num_clusters, config, seed=seed, use_gpu=use_gpu)
    if previous is not None:
        assignment = clustering.match_clusters(previous, assignment, num_clusters=num_clusters)
    return _finish(assignment, labels, num_clusters, previous)


def split_in_two(
    embeddings: np.ndarray,
    labels: np.ndarray,
    parents: np.ndarray,
    num_parents: int,
    config: ClusterConfig,
    *,
    seed: int,
    previous: np.ndarray | None = None,
    use_gpu: bool | None = None,
    trials: int = 10,
) -> Division:
    """Hierarchical division: 2-means inside each of the ``num_parents`` clusters of
    ``parents`` (n,); cluster ``j``'s halves become clusters ``2j`` and ``2j + 1`` (so child
    ``2j + 1`` starts from learner ``j``'s mask or the second half of its slice).

    As in the authors' code, a split whose halves cannot both train (each needs two classes
    with two images) is redrawn with another seed, up to ``trials`` times; only if none
    works do the guards move classes (possibly across parents, counted in ``learner_kept``).
    """
    parents = np.asarray(parents, dtype=np.int64)
    assignment = 2 * parents
    for parent in range(num_parents):
        members = np.flatnonzero(parents == parent)
        if members.size < 2:
            continue
        for trial in range(trials):
            trial_seed = (seed + 7919 * (parent + 1) + 104729 * trial) % 2**31
            halves = _kmeans(embeddings[members], 2, config, seed=trial_seed, use_gpu=use_gpu)
            if all(_trainable_classes(labels[members][halves == half]) >= 2 for half in (0, 1)):
                break
        assignment[members] = 2 * parent + halves
    division = _finish(assignment, labels, 2 * num_parents, None)
    if previous is not None:
        division.stats["nmi_to_previous"] = clustering.assignment_nmi(previous, division.assignment)
        division.stats["learner_kept"] = _kept(previous, division.assignment // 2)
    return division


def _trainable_classes(labels: np.ndarray) -> int:
    """Classes with at least two images (a positive pair)."""
    _, counts = np.unique(labels, return_counts=True)
    return int((counts >= 2).sum())


def next_division(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_clusters: int,
    config: ClusterConfig,
    *,
    seed: int,
    previous: Division | None = None,
    use_gpu: bool | None = None,
) -> Division:
    """The one rule for a new division, used by every driver.

    Same number of clusters as ``previous``: k-means, matched to it (Hungarian). Twice as
    many (hierarchical, TPAMI'21): re-cluster into the previous number (matched) as the
    authors do, then split each cluster in two. Otherwise (the first division): k-means.

    With ``config.space == "backbone"`` the rows are pooled backbone features, which are
    L2-normalised first (as the authors' ``penultimate_for_clusters`` does): otherwise the
    features' norms, not their directions, would decide the division.
    """
    if config.space == "backbone":
        embeddings = normalized_rows(embeddings)
    before = previous.assignment if previous is not None else None
    if config.hierarchical and num_clusters > 1:
        parents_k = previous.num_clusters if previous is not None else 1
        if num_clusters == 2 * parents_k:
            parents = _kmeans(embeddings, parents_k, config, seed=seed, use_gpu=use_gpu)
            if before is not None and parents_k > 1:
                parents = clustering.match_clusters(before, parents, num_clusters=parents_k)
            return split_in_two(
                embeddings, labels, parents, parents_k, config, seed=seed, previous=before, use_gpu=use_gpu
            )
    keep_previous = previous is not None and previous.num_clusters == num_clusters
    return divide(
        embeddings,
        labels,
        num_clusters,
        config,
        seed=seed,
        previous=before if keep_previous else None,
        use_gpu=use_gpu,
    )


def _kmeans(
    embeddings: np.ndarray, num_clusters: int, config: ClusterConfig, *, seed: int, use_gpu: bool | None
) -> np.ndarray:
    return clustering.kmeans(
        np.ascontiguousarray(embeddings, dtype=np.float32),
        num_clusters,
        niter=config.niter,
        nredo=config.nredo,
        seed=seed,
        max_points_per_centroid=config.max_points_per_centroid,
        use_gpu=use_gpu,
    )


def _finish(assignment: np.ndarray, labels: np.ndarray, num_clusters: int, previous: np.ndarray | None) -> Division:
    """Guards (every learner trainable, singletons dropped) and statistics."""
    keep, _ = clustering.drop_singleton_images(assignment, labels)
    assignment = clustering.ensure_trainable(assignment, labels, keep, num_clusters=num_clusters)
    keep, num_dropped = clustering.drop_singleton_images(assignment, labels)
    stats = clustering.cluster_stats(assignment, num_clusters)
    if previous is not None:
        stats["nmi_to_previous"] = clustering.assignment_nmi(previous, assignment)
        stats["learner_kept"] = _kept(previous, assignment)
    stats["images_dropped"] = float(num_dropped)
    return Division(assignment, keep, num_clusters, num_dropped, stats)


def _kept(previous: np.ndarray, learners: np.ndarray) -> float:
    """Fraction of images (assigned before) whose learner is unchanged — the parent's
    after a split — i.e. how much of its data each learner keeps across a division."""
    valid = previous >= 0
    return float(np.mean(previous[valid] == learners[valid])) if valid.any() else 0.0
