"""Parquet and JSON files the tasks exchange, always written atomically.

Schemas:
- embeddings: ``index`` int64 (row in the split's records), ``label`` int64,
  ``embedding`` fixed_size_list<float32>[D]; metadata ``split``, ``epoch``, ``num_learners``.
- division: ``index`` int64, ``label`` int64, ``cluster`` int64, ``keep`` bool;
  metadata ``num_clusters``, ``epoch``, ``stats`` (JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcml.atomic import atomic_path, write_text_atomic
from dcml.division import Division


def _write_table(path: str | Path, table: pa.Table, metadata: dict[str, Any]) -> Path:
    table = table.replace_schema_metadata({k: json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def _read_table(path: str | Path) -> tuple[pa.Table, dict[str, Any]]:
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    metadata = {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW")}
    return table, metadata


def write_embeddings(
    path: str | Path, embeddings: np.ndarray, labels: np.ndarray, indices: np.ndarray, **metadata: Any
) -> Path:
    """``embeddings`` (n, D) float32, ``labels``/``indices`` (n,) int64."""
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    table = pa.table(
        {
            "index": pa.array(indices, pa.int64()),
            "label": pa.array(labels, pa.int64()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    return _write_table(path, table, metadata)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Inverse of :func:`write_embeddings`: ``(embeddings, labels, indices, metadata)``."""
    table, metadata = _read_table(path)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    embeddings = column.flatten().to_numpy().reshape(-1, dim).astype(np.float32, copy=False)
    return embeddings, table.column("label").to_numpy(), table.column("index").to_numpy(), metadata


def write_division(path: str | Path, division: Division, labels: np.ndarray, **metadata: Any) -> Path:
    table = pa.table(
        {
            "index": pa.array(np.arange(len(labels)), pa.int64()),
            "label": pa.array(labels, pa.int64()),
            "cluster": pa.array(division.assignment, pa.int64()),
            "keep": pa.array(division.keep, pa.bool_()),
        }
    )
    meta = {
        "num_clusters": division.num_clusters,
        "num_dropped": division.num_dropped,
        "stats": division.stats,
    }
    return _write_table(path, table, {**meta, **metadata})


def read_division(path: str | Path) -> Division:
    table, metadata = _read_table(path)
    return Division(
        assignment=table.column("cluster").to_numpy(),
        keep=table.column("keep").to_numpy(zero_copy_only=False).astype(bool),
        num_clusters=int(metadata["num_clusters"]),
        num_dropped=int(metadata["num_dropped"]),
        stats=metadata["stats"],
    )


def write_json(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
