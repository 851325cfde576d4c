"""Retrieval metrics: Recall@k, MAP@R, R-precision (chunked faiss kNN) and NMI (k-means).

numpy in, Python floats out. Neighbours are exact Euclidean (faiss ``IndexFlatL2``) on
the embeddings as given. Queries are searched in chunks and each chunk's neighbours are
reduced to per-query statistics at once, so memory stays O(chunk x k + n), which keeps
SOP scale (60k x 2048, k = 1000) bounded on CPU. Labels may be any sortable values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from dcml.clustering import NMI_AVERAGE_METHOD, kmeans
from dcml.faiss_backend import flat_l2_index

DEFAULT_CHUNK_SIZE = 8192
# NMI's normaliser (dcml.clustering.NMI_AVERAGE_METHOD), passed to sklearn explicitly:
# "arithmetic" (sklearn's default since 0.22) divides I(labels; clusters) by the mean of
# the two entropies. Other papers' tables may use "geometric" (the default before 0.22);
# `dcml evaluate` prints the method and every MLflow run has it as a tag.
# Cap on one chunk's (rows x k) neighbour block: 2**25 entries = 384 MiB of float32 + int64.
_MAX_BLOCK_ENTRIES = 2**25


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    return x


def _drop_self(distances: np.ndarray, indices: np.ndarray, self_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove from each row its own index (first occurrence), else the last column.

    Exact duplicates can push the query out of its own k+1 list or ahead of it; either way
    exactly one column is removed and the remaining order is kept.
    """
    is_self = indices == self_ids[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), indices.shape[1] - 1)
    keep = np.ones(indices.shape, dtype=bool)
    keep[np.arange(len(indices)), drop] = False
    k = indices.shape[1] - 1
    return distances[keep].reshape(-1, k), indices[keep].reshape(-1, k)


def iter_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: bool | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Chunked exact kNN: yields ``(start, distances, indices)`` per block of query rows.

    ``distances`` (c, k) float32 are **squared** L2, ascending; ``indices`` (c, k) int64
    index ``gallery``; rows are ``queries[start:start + c]``. With ``exclude_self`` the
    gallery must be the query set itself and each query's own index is removed.
    Arguments are validated and the index built before the first chunk is requested.
    """
    queries, gallery = _as_matrix(queries, "queries"), _as_matrix(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"dimension mismatch: queries {queries.shape} vs gallery {gallery.shape}")
    if exclude_self and len(queries) != len(gallery):
        raise ValueError("exclude_self=True needs the gallery to be the query set itself")
    limit = len(gallery) - int(exclude_self)
    if not 1 <= k <= limit:
        what = "n - 1 (query excluded)" if exclude_self else "the gallery size"
        raise ValueError(f"k={k} must be in [1, {limit}] = [1, {what}]")
    search_k = k + int(exclude_self)
    index = flat_l2_index(gallery.shape[1], use_gpu=use_gpu, k=search_k)
    index.add(gallery)
    rows = max(1, min(chunk_size, _MAX_BLOCK_ENTRIES // search_k))

    def chunks() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for start in range(0, len(queries), rows):
            distances, indices = index.search(queries[start : start + rows], search_k)
            indices = indices.astype(np.int64, copy=False)
            if exclude_self:
                distances, indices = _drop_self(distances, indices, np.arange(start, start + len(indices)))
            yield start, distances, indices

    return chunks()


def knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest gallery items of each query: ``(distances (n, k) float32 squared L2,
    indices (n, k) int64)``, ascending distance. See :func:`iter_knn`."""
    blocks = list(iter_knn(queries, gallery, k, exclude_self=exclude_self, chunk_size=chunk_size, use_gpu=use_gpu))
    if not blocks:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate([b[1] for b in blocks]), np.concatenate([b[2] for b in blocks])


def _first_hit_rank(matches: np.ndarray) -> np.ndarray:
    """(c,) int64 0-based rank of the first relevant neighbour; k when there is none."""
    return np.where(matches.any(1), matches.argmax(1), matches.shape[1]).astype(np.int64)


def _precision_at_r(matches: np.ndarray, relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AP@R, R-precision) per row, (c,) float64 each; NaN where R = 0.

    AP@R = (1/R) sum_{i<=R} P(i) rel(i), R-precision = (#relevant in top R) / R.
    """
    width = min(matches.shape[1], int(relevant.max(initial=0)))
    ranks = np.arange(width)
    hits = matches[:, :width] & (ranks < relevant[:, None])
    precision = np.cumsum(hits, axis=1) / (ranks + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        average_precision = (precision * hits).sum(1) / relevant
        r_prec = hits.sum(1) / relevant
    average_precision[relevant == 0] = np.nan
    r_prec[relevant == 0] = np.nan
    return average_precision, r_prec


def _ranking_stats(
    queries: np.ndarray,
    query_codes: np.ndarray,
    gallery: np.ndarray,
    gallery_codes: np.ndarray,
    k: int,
    relevant: np.ndarray | None,
    **knn_kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunked kNN reduced to per-query (first_hit, AP@R, R-precision), each (n,)."""
    n = len(query_codes)
    first_hit = np.full(n, k, dtype=np.int64)
    average_precision = np.full(n, np.nan)
    r_prec = np.full(n, np.nan)
    if k == 0:
        return first_hit, average_precision, r_prec
    for start, _, indices in iter_knn(queries, gallery, k, **knn_kwargs):
        rows = slice(start, start + len(indices))
        matches = gallery_codes[indices] == query_codes[rows, None]
        first_hit[rows] = _first_hit_rank(matches)
        if relevant is not None:
            average_precision[rows], r_prec[rows] = _precision_at_r(matches, relevant[rows])
    return first_hit, average_precision, r_prec


def _same_set_codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class codes (n,), R (n,) = number of OTHER items with the query's label)."""
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    codes = codes.ravel()
    return codes, counts[codes] - 1


def _query_gallery_codes(
    query_labels: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query codes, gallery codes, R (n_q,) = number of gallery items with the query's label)."""
    _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    codes = codes.ravel()
    query_codes, gallery_codes = codes[: len(query_labels)], codes[len(query_labels) :]
    relevant = np.bincount(gallery_codes, minlength=int(codes.max(initial=0)) + 1)[query_codes]
    return query_codes, gallery_codes, relevant


def _check_ks(ks: Sequence[int], limit: int, what: str) -> list[int]:
    ks = [int(k) for k in ks]
    bad = [k for k in ks if not 1 <= k <= limit]
    if bad:
        raise ValueError(f"recall ks {bad} out of range: k must be in [1, {limit}] ({what})")
    return ks


def _check_labels(embeddings: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if len(labels) != len(embeddings):
        raise ValueError(f"{name}: {len(embeddings)} embeddings but {len(labels)} labels")
    return labels


def _nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries (queries with R = 0 are skipped); NaN if none remain."""
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else float("nan")


def _summarise(
    first_hit: np.ndarray, ap: np.ndarray, rp: np.ndarray, ks: list[int], with_map: bool
) -> dict[str, float]:
    out = {f"recall@{k}": float(np.mean(first_hit < k)) for k in ks}
    if with_map:
        out["map@r"], out["r_precision"] = _nanmean(ap), _nanmean(rp)
    return out


def evaluate_retrieval(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int],
    *,
    nmi_seed: int = 0,
    with_nmi: bool = True,
    with_map: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: bool | None = None,
) -> dict[str, float]:
    """All same-set metrics from ONE chunked kNN with k = max(max(ks), max R).

    Every item is a query against all others (itself excluded). A query whose class has
    no other item counts as a miss for recall and is skipped for MAP@R / R-precision.

    Args:
        embeddings: (n, d) float32; labels: (n,) class labels; ks: recall cut-offs, each
        in [1, n - 1]; nmi_seed: k-means seed for NMI.

    Returns:
        ``recall@{k}`` per k, plus ``map@r`` and ``r_precision`` (with_map) and ``nmi``
        (with_nmi), Python floats.
    """
    embeddings = _as_matrix(embeddings, "embeddings")
    labels = _check_labels(embeddings, labels, "embeddings")
    ks = _check_ks(ks, len(labels) - 1, "n - 1, query excluded")
    codes, relevant = _same_set_codes(labels)
    k = max(ks, default=0)
    if with_map:
        k = max(k, int(relevant.max(initial=0)))
    stats = _ranking_stats(
        embeddings,
        codes,
        embeddings,
        codes,
        k,
        relevant if with_map else None,
        exclude_self=True,
        chunk_size=chunk_size,
        use_gpu=use_gpu,
    )
    out = _summarise(*stats, ks, with_map)
    if with_nmi:
        out["nmi"] = nmi(embeddings, labels, seed=nmi_seed, use_gpu=use_gpu)
    return out


def evaluate_query_gallery(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int],
    *,
    with_map: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: bool | None = None,
) -> dict[str, float]:
    """In-shop protocol: queries (n_q, d) search the gallery (n_g, d) only, no self exclusion.

    R for MAP@R / R-precision = number of gallery items with the query's label (queries
    with R = 0 skipped). Returns ``recall@{k}`` (k in [1, n_g]), ``map@r``, ``r_precision``.
    """
    query_embeddings = _as_matrix(query_embeddings, "query_embeddings")
    gallery_embeddings = _as_matrix(gallery_embeddings, "gallery_embeddings")
    query_labels = _check_labels(query_embeddings, query_labels, "query")
    gallery_labels = _check_labels(gallery_embeddings, gallery_labels, "gallery")
    ks = _check_ks(ks, len(gallery_labels), "gallery size")
    query_codes, gallery_codes, relevant = _query_gallery_codes(query_labels, gallery_labels)
    k = max(ks, default=0)
    if with_map:
        k = max(k, int(relevant.max(initial=0)))
    stats = _ranking_stats(
        query_embeddings,
        query_codes,
        gallery_embeddings,
        gallery_codes,
        k,
        relevant if with_map else None,
        chunk_size=chunk_size,
        use_gpu=use_gpu,
    )
    return _summarise(*stats, ks, with_map)


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int], **kwargs) -> dict[int, float]:
    """{k: fraction of queries with >= 1 same-label item among their k nearest others}.

    embeddings (n, d) float32, labels (n,); each k in [1, n - 1] (ValueError otherwise).
    ``kwargs``: chunk_size, use_gpu.
    """
    out = evaluate_retrieval(embeddings, labels, ks, with_nmi=False, with_map=False, **kwargs)
    return {int(k): out[f"recall@{int(k)}"] for k in ks}


def recall_at_k_query_gallery(
    query_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_embeddings: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int],
    **kwargs,
) -> dict[int, float]:
    """Recall@k of queries against a separate gallery (In-shop); see evaluate_query_gallery."""
    out = evaluate_query_gallery(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks, with_map=False, **kwargs
    )
    return {int(k): out[f"recall@{int(k)}"] for k in ks}


def map_at_r(embeddings: np.ndarray, labels: np.ndarray, **kwargs) -> float:
    """MAP@R (Musgrave et al. 2020), R = number of OTHER items with the query's label.

    AP@R = (1/R) sum_{i<=R} P(i) rel(i) over the R nearest others; queries with R = 0 are
    skipped (NaN if all are). ``kwargs``: chunk_size, use_gpu.
    """
    return evaluate_retrieval(embeddings, labels, (), with_nmi=False, **kwargs)["map@r"]


def r_precision(embeddings: np.ndarray, labels: np.ndarray, **kwargs) -> float:
    """Mean over queries with R > 0 of (#same-label items among the R nearest others) / R."""
    return evaluate_retrieval(embeddings, labels, (), with_nmi=False, **kwargs)["r_precision"]


def nmi(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    average_method: str = NMI_AVERAGE_METHOD,
    niter: int = 20,
    use_gpu: bool | None = None,
) -> float:
    """sklearn NMI between ``labels`` (n,) and a faiss k-means of ``embeddings`` (n, d)
    into as many clusters as there are distinct labels, normalised by ``average_method``
    (the pipeline's: :data:`NMI_AVERAGE_METHOD`)."""
    embeddings = _as_matrix(embeddings, "embeddings")
    labels = _check_labels(embeddings, labels, "embeddings")
    num_classes = len(np.unique(labels))
    assignment = kmeans(embeddings, num_classes, niter=niter, seed=seed, use_gpu=use_gpu)
    return float(normalized_mutual_info_score(labels, assignment, average_method=average_method))


def ranking_summary(
    gallery_codes: np.ndarray,
    ranked: Sequence[np.ndarray],
    query_codes: np.ndarray,
    relevant: np.ndarray | None,
    ks: Sequence[int],
) -> dict[str, float]:
    """Recall@k (and with ``relevant`` MAP@R and R-precision) of rankings computed elsewhere
    (a saved faiss index): ``ranked[q]`` holds the gallery positions query ``q`` retrieved,
    best first (itself already left out; may be shorter than the others), ``gallery_codes``
    / ``query_codes`` integer labels, ``relevant`` (n,) each query's R."""
    ks = [int(k) for k in ks]
    width = max([len(r) for r in ranked] + [max(ks, default=0)])
    positions = np.full((len(ranked), width), -1, dtype=np.int64)
    for row, found in enumerate(ranked):
        positions[row, : len(found)] = found
    matches = (positions >= 0) & (gallery_codes[np.maximum(positions, 0)] == np.asarray(query_codes)[:, None])
    first_hit = _first_hit_rank(matches)
    if relevant is None:
        nan = np.full(len(ranked), np.nan)
        return _summarise(first_hit, nan, nan, ks, False)
    return _summarise(first_hit, *_precision_at_r(matches, np.asarray(relevant)), ks, True)
