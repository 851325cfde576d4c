"""The division step: k-means, Hungarian cluster-to-learner matching, trainability guards.

Label convention: an assignment is an ``(n,)`` int64 array of cluster ids in ``0..K-1``;
a negative id marks an image excluded from the division (e.g. dropped singletons).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score

# faiss through faiss_backend: a missing faiss then fails with the install hint
from dcml.faiss_backend import faiss, flat_l2_index, resolve_use_gpu

_INT32_MAX = 2**31 - 1
# sklearn's normalized_mutual_info_score normalisation, for every NMI we report (test NMI
# and the NMI between consecutive divisions); papers using "geometric" report other values
NMI_AVERAGE_METHOD = "arithmetic"


def kmeans_seed(run_seed: int, division_index: int) -> int:
    """Deterministic faiss k-means seed for the ``division_index``-th (re)clustering of a run.

    ``(run_seed * 1000 + division_index) mod (2**31 - 1)``: distinct for the first 1000
    divisions of a run and always a valid non-negative C ``int``.
    """
    if division_index < 0:
        raise ValueError(f"division_index must be >= 0, got {division_index}")
    return (run_seed * 1000 + division_index) % _INT32_MAX


def build_kmeans(
    dim: int,
    k: int,
    *,
    niter: int = 20,
    nredo: int = 1,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool | None = None,
) -> faiss.Kmeans:
    """Configured (untrained) ``faiss.Kmeans``; every argument lands in ``kmeans.cp``.

    On GPU its assignment index (``kmeans.index``, used by ``train`` and for the final
    assignment) is a ``GpuIndexFlatL2`` on the shared :func:`dcml.faiss_backend.gpu_resources`
    and the current device, instead of faiss's own resources on all GPUs (``gpu=True``).
    """
    model = faiss.Kmeans(
        dim,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        # small clusters are legitimate here (NMI with one cluster per test class):
        # without this faiss warns on stderr when n < 39 * k
        min_points_per_centroid=1,
        verbose=False,
    )
    if resolve_use_gpu(use_gpu):
        model.index = flat_l2_index(dim, use_gpu=True)
    return model


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    nredo: int = 1,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Cluster ``x`` (n, d) float32 into ``k`` clusters; returns the assignment (n,) int64.

    ``nredo`` restarts keep the lowest objective; ``max_points_per_centroid`` subsamples
    the training set to ``k * max_points_per_centroid`` points (assignment covers all).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, dim = x.shape
    if k < 1 or k > n:
        raise ValueError(f"k must be in [1, n={n}], got k={k}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    model = build_kmeans(
        dim,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        use_gpu=use_gpu,
    )
    model.train(x)
    _, nearest = model.index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def _num_clusters(previous: np.ndarray, current: np.ndarray, num_clusters: int | None) -> int:
    if current.size and current.min() < 0:
        raise ValueError("current assignment must not contain negative cluster ids")
    valid_previous = previous[previous >= 0]
    k_current = int(current.max()) + 1 if current.size else 0
    k_previous = int(valid_previous.max()) + 1 if valid_previous.size else 0
    if num_clusters is None:
        if k_current != k_previous:
            raise ValueError(
                f"previous has {k_previous} clusters but current has {k_current} "
                "(pass num_clusters=K when a cluster may be empty)"
            )
        return k_current
    if max(k_current, k_previous) > num_clusters:
        raise ValueError(f"cluster ids must lie in 0..{num_clusters - 1}")
    return num_clusters


def match_clusters(previous: np.ndarray, current: np.ndarray, *, num_clusters: int | None = None) -> np.ndarray:
    """Relabel ``current`` so each learner keeps the cluster overlapping its previous one most.

    Hungarian assignment on cost[new i, old j] = |i Δ j| = |i| + |j| - 2|i ∩ j|; new
    cluster i is renamed to its matched old label j (correct for any permutation).
    Entries with ``previous < 0`` (images excluded from the previous division) count
    neither in the overlaps nor in the sizes, but are relabelled like the others.

    Args:
        previous: (n,) int, previous assignment, ids in 0..K-1 or negative.
        current: (n,) int, new assignment, ids in 0..K-1.
        num_clusters: K; inferred (and required equal for both) when None.

    Returns:
        (n,) int64, ``current`` with renamed cluster ids.
    """
    previous = np.asarray(previous, dtype=np.int64)
    current = np.asarray(current, dtype=np.int64)
    if previous.shape != current.shape:
        raise ValueError(f"shape mismatch: previous {previous.shape} vs current {current.shape}")
    k = _num_clusters(previous, current, num_clusters)
    valid = previous >= 0
    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (current[valid], previous[valid]), 1)
    cost = overlap.sum(1)[:, None] + overlap.sum(0)[None, :] - 2 * overlap
    new_ids, old_ids = linear_sum_assignment(cost)
    rename = np.empty(k, dtype=np.int64)
    rename[new_ids] = old_ids
    return rename[current]


def _group_sizes(assignment: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) int64 size of each image's (cluster, class) group."""
    _, class_codes = np.unique(labels, return_inverse=True)
    group_codes = (assignment + 1) * (int(class_codes.max()) + 1) + class_codes.ravel()
    _, group, sizes = np.unique(group_codes, return_inverse=True, return_counts=True)
    return sizes[group.ravel()]


def drop_singleton_images(assignment: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Images alone with their class inside their cluster cannot form a positive pair.

    As in the authors' code they are dropped until the next division; we count them.
    Images with a negative cluster id are not kept either (and not counted as dropped).

    Args:
        assignment: (n,) int cluster ids; labels: (n,) class labels.

    Returns:
        keep_mask: (n,) bool; num_dropped: number of singleton images dropped.
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    assigned = assignment >= 0
    if assignment.size == 0:
        return assigned, 0
    singles = assigned & (_group_sizes(assignment, np.asarray(labels)) < 2)
    return assigned & ~singles, int(singles.sum())


def cluster_stats(assignment: np.ndarray, num_clusters: int) -> dict[str, float]:
    """Size summary of an assignment (negative ids ignored).

    Returns ``size_min``, ``size_max`` and ``size_entropy`` (Shannon entropy of the size
    distribution divided by log K: 1.0 = perfectly balanced, 0.0 = one cluster holds all).
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    sizes = np.bincount(assignment[assignment >= 0], minlength=num_clusters)
    total = sizes.sum()
    entropy = 1.0
    if num_clusters > 1 and total > 0:
        p = sizes[sizes > 0] / total
        entropy = float(-(p * np.log(p)).sum() / np.log(num_clusters))
    return {"size_min": int(sizes.min()), "size_max": int(sizes.max()), "size_entropy": entropy}


def assignment_nmi(previous: np.ndarray, current: np.ndarray) -> float:
    """sklearn NMI between two consecutive assignments (entries with ``previous < 0`` ignored)."""
    previous = np.asarray(previous, dtype=np.int64)
    current = np.asarray(current, dtype=np.int64)
    valid = previous >= 0
    return float(normalized_mutual_info_score(previous[valid], current[valid], average_method=NMI_AVERAGE_METHOD))


def ensure_trainable(
    assignment: np.ndarray,
    labels: np.ndarray,
    keep_mask: np.ndarray,
    *,
    num_clusters: int | None = None,
    min_classes: int = 2,
) -> np.ndarray:
    """Guarantee every learner at least ``min_classes`` trainable classes.

    A class is *trainable* in a cluster when it has >= 2 kept images there (a positive
    pair). While some cluster is starving (< ``min_classes`` trainable classes), taken in
    increasing id order: pick the largest cluster (most images, lowest id on ties) that
    has > ``min_classes`` trainable classes, take its trainable class with the most kept
    images that is not already trainable in the starving cluster (lowest class on ties),
    and move all of that class's images in the donor to the starving cluster. Each move
    keeps the total number of trainable (cluster, class) groups, so this succeeds exactly
    when that total is >= K * ``min_classes``; otherwise ValueError (K too large).
    The caller must recompute ``keep_mask`` afterwards with :func:`drop_singleton_images`.

    Args:
        assignment: (n,) int cluster ids (negative = excluded, never moved).
        labels: (n,) class labels.
        keep_mask: (n,) bool, images usable for training (from drop_singleton_images).
        num_clusters: K; ``assignment.max() + 1`` when None.
        min_classes: trainable classes required per cluster.

    Returns:
        (n,) int64 new assignment (a copy; unchanged when nothing starves).
    """
    assignment = np.array(assignment, dtype=np.int64)
    _, class_codes = np.unique(np.asarray(labels), return_inverse=True)
    class_codes = class_codes.ravel()
    k = int(assignment.max()) + 1 if num_clusters is None else num_clusters
    kept = np.asarray(keep_mask, dtype=bool) & (assignment >= 0)
    counts = np.zeros((k, int(class_codes.max()) + 1), dtype=np.int64)
    np.add.at(counts, (assignment[kept], class_codes[kept]), 1)
    sizes = np.bincount(assignment[assignment >= 0], minlength=k)
    available = int((counts >= 2).sum())
    if available < k * min_classes:
        raise ValueError(
            f"K={k} is too large for the data: each learner needs {min_classes} classes with >= 2 "
            f"images but only {available} such (cluster, class) groups exist; lower K"
        )
    while True:
        per_cluster = (counts >= 2).sum(1)
        starving = np.flatnonzero(per_cluster < min_classes)
        if starving.size == 0:
            return assignment
        target = starving[0]
        donors = np.flatnonzero(per_cluster > min_classes)
        donor = donors[np.argmax(sizes[donors])]
        candidates = (counts[donor] >= 2) & (counts[target] < 2)
        moved_class = int(np.argmax(np.where(candidates, counts[donor], -1)))
        move = (assignment == donor) & (class_codes == moved_class)
        assignment[move] = target
        sizes[donor] -= move.sum()
        sizes[target] += move.sum()
        counts[target, moved_class] += counts[donor, moved_class]
        counts[donor, moved_class] = 0
