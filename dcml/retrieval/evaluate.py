"""Label recall@k and MAP@R of queries searched through a saved index.

A query never retrieves itself: when the queries are the index's own embeddings (same
digest) its own position is excluded, otherwise every indexed image with the same file
content (SHA-256) as the query. R for MAP@R is the number of indexed items with the
query's label that are not excluded, as in :func:`dcml.metrics.evaluate_retrieval`,
whose results a ``Flat`` index over a run's test split reproduces.

For an approximate index the same queries are also searched exactly (a flat index over
the embeddings it was built from): neighbour recall@k = |approximate top k ∩ exact top
k| / k, and the label metrics of both with their difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dcml.metrics import ranking_summary
from dcml.retrieval import RetrievalError
from dcml.retrieval.index import IndexFolder, make_index, normalized
from dcml.retrieval.store import EmbeddingSet

CHUNK = 4096


def evaluate_index(
    index: IndexFolder,
    queries: EmbeddingSet,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    exact_embeddings: EmbeddingSet | None = None,
    with_map: bool = True,
) -> dict[str, Any]:
    """Metrics of ``queries`` through ``index`` (see the module docstring).

    ``exact_embeddings``: the embeddings the index was built from, for the exact
    reference of an approximate index (needed then; ignored for ``Flat``).
    """
    check_compatible(index, queries)
    if any(label is None for label in queries.labels) or any(label is None for label in index.labels):
        raise RetrievalError("index eval needs labels on the queries and the indexed images (class sub-folders)")
    same_set = queries.info["digest"] == index.info["embeddings"]["digest"]
    ks = sorted({int(k) for k in ks})
    exclusions = _exclusions(index, queries, same_set)
    query_codes, index_codes = _codes(queries.labels, index.labels)
    per_class = np.bincount(index_codes, minlength=int(max(query_codes.max(), index_codes.max())) + 1)
    excluded_same = np.array(
        [np.count_nonzero(index_codes[e] == code) for e, code in zip(exclusions, query_codes, strict=True)], np.int64
    )
    relevant = per_class[query_codes] - excluded_same
    limit = index.index.ntotal - max((len(e) for e in exclusions), default=0)
    bad = [k for k in ks if not 1 <= k <= limit]
    if bad:
        raise RetrievalError(f"--k {bad} out of range: the index holds {limit} items a query may retrieve")
    depth = max(ks[-1], int(relevant.max(initial=0)) if with_map else 0)
    approx = _ranked(index.search, queries.embeddings, exclusions, depth)
    result: dict[str, Any] = {
        "factory": index.info["factory"],
        "count": int(index.index.ntotal),
        "num_queries": len(queries),
        "same_set": bool(same_set),
        **ranking_summary(index_codes, approx, query_codes, relevant if with_map else None, ks),
    }
    if not index.exact:
        if exact_embeddings is None:
            raise RetrievalError(
                f"{index.path} is approximate ({index.info['factory']}): its embeddings folder "
                f"{index.info['embeddings']['folder']} is needed for the exact reference"
            )
        exact_index, _ = make_index(normalized(exact_embeddings.embeddings), "Flat", use_gpu=False)

        def exact_search(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            scores, positions = exact_index.search(normalized(vectors), min(k, exact_index.ntotal))
            return scores, positions.astype(np.int64)

        exact = _ranked(exact_search, queries.embeddings, exclusions, depth)
        exact_metrics = ranking_summary(index_codes, exact, query_codes, relevant if with_map else None, ks)
        for k in ks:
            overlap = [len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact, strict=True)]
            result[f"neighbor_recall@{k}"] = float(np.mean(overlap))
        for name, value in exact_metrics.items():
            result[f"exact_{name}"] = value
            result[f"{name}_diff_vs_exact"] = result[name] - value
    return result


def check_compatible(index: IndexFolder, queries: EmbeddingSet) -> None:
    """Queries must come from the index's model and have its dimension."""
    want, got = index.info["model"].get("sha256"), queries.info["model"].get("sha256")
    if want != got:
        raise RetrievalError(
            f"the queries were embedded by another model ({queries.info['model'].get('checkpoint')}, sha256 "
            f"{str(got)[:12]}) than the index {index.path} ({index.info['model'].get('checkpoint')}, {str(want)[:12]})"
        )
    if queries.embeddings.shape[1] != index.dimension:
        raise RetrievalError(f"queries have dimension {queries.embeddings.shape[1]}, the index {index.dimension}")


def _exclusions(index: IndexFolder, queries: EmbeddingSet, same_set: bool) -> list[np.ndarray]:
    """Per query, the index positions it must not retrieve."""
    if same_set:
        return [np.array([q], np.int64) for q in range(len(queries))]
    by_hash: dict[str, list[int]] = {}
    for position, sha in enumerate(index.sha256):
        by_hash.setdefault(sha, []).append(position)
    return [np.array(by_hash.get(sha, []), np.int64) for sha in queries.sha256]


def _ranked(search, vectors: np.ndarray, exclusions: list[np.ndarray], depth: int) -> list[np.ndarray]:
    """Per query, the first ``depth`` retrieved positions that are not excluded (fewer if the
    index returns fewer: -1 entries are dropped)."""
    extra = max((len(e) for e in exclusions), default=0)
    ranked = []
    for start in range(0, len(vectors), CHUNK):
        _, positions = search(vectors[start : start + CHUNK], depth + extra)
        for row, found in enumerate(positions):
            excluded = exclusions[start + row]
            keep = (found >= 0) & ~np.isin(found, excluded)
            ranked.append(found[keep][:depth])
    return ranked


def _codes(query_labels: list[str], index_labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    _, codes = np.unique(
        np.array(list(query_labels) + list(index_labels), dtype=object).astype(str), return_inverse=True
    )
    codes = codes.ravel().astype(np.int64)
    return codes[: len(query_labels)], codes[len(query_labels) :]
