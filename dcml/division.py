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
    assignment = clustering.kmeans(
        np.ascontiguousarray(embeddings, dtype=np.float32),
        num_clusters,
        niter=config.niter,
        nredo=config.nredo,
        seed=seed,
        max_points_per_centroid=config.max_points_per_centroid,
        use_gpu=use_gpu,
    )
    if previous is not None:
        assignment = clustering.match_clusters(previous, assignment, num_clusters=num_clusters)
    keep, _ = clustering.drop_singleton_images(assignment, labels)
    assignment = clustering.ensure_trainable(assignment, labels, keep, num_clusters=num_clusters)
    keep, num_dropped = clustering.drop_singleton_images(assignment, labels)
    stats = clustering.cluster_stats(assignment, num_clusters)
    if previous is not None:
        stats["nmi_to_previous"] = clustering.assignment_nmi(previous, assignment)
    stats["images_dropped"] = float(num_dropped)
    return Division(assignment, keep, num_clusters, num_dropped, stats)
