"""The embedding folder that ``dcml embed`` writes and the index commands read.

Layout of ``DIR``::

    listing.parquet            what is embedded: id, path, label (written first)
    shards/part-NNNNN.parquet  one per block of ids, written atomically
    unreadable.txt             path<TAB>error of every image that could not be read
    info.json                  written last: the folder is complete when it exists

Shard schema (every shard the same): ``id`` int64 (row of the listing), ``path`` string,
``label`` string (null without labels), ``sha256`` string (hex digest of the file's
bytes), ``embedding`` fixed_size_list<float32>[dimension]. Unreadable images have no row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcml.atomic import atomic_path, write_text_atomic
from dcml.retrieval import RetrievalError
from dcml.retrieval.images import Listing

FORMAT = "dcml-embeddings/1"
INFO = "info.json"
LISTING = "listing.parquet"
UNREADABLE = "unreadable.txt"
SHARDS = "shards"


def schema(dimension: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("label", pa.string()),
            ("sha256", pa.string()),
            ("embedding", pa.list_(pa.float32(), dimension)),
        ]
    )


@dataclass(frozen=True)
class EmbeddingSet:
    """Rows of an embedding folder in id order; ``info`` is its ``info.json``."""

    ids: np.ndarray  # (n,) int64
    paths: list[str]
    labels: list[str | None]
    sha256: list[str]
    embeddings: np.ndarray  # (n, d) float32
    info: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)


def shard_path(folder: str | Path, number: int) -> Path:
    return Path(folder) / SHARDS / f"part-{number:05d}.parquet"


def write_listing(folder: str | Path, listing: Listing) -> Path:
    table = pa.table(
        {
            "id": pa.array(np.arange(len(listing)), pa.int64()),
            "path": pa.array(listing.paths, pa.string()),
            "label": pa.array(listing.labels, pa.string()),
        }
    )
    table = table.replace_schema_metadata({"source": listing.source})
    path = Path(folder) / LISTING
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_listing(folder: str | Path) -> Listing:
    table = pq.read_table(Path(folder) / LISTING)
    source = (table.schema.metadata or {}).get(b"source", b"").decode()
    return Listing(tuple(table.column("path").to_pylist()), tuple(table.column("label").to_pylist()), source)


def write_shard(
    path: str | Path,
    ids: np.ndarray,
    listing: Listing,
    sha256: list[str],
    embeddings: np.ndarray,
    unreadable: list[tuple[int, str]],
) -> Path:
    """One shard: the readable rows, and (metadata ``unreadable``) the ids and errors of the others."""
    dimension = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), pa.float32())
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": pa.array([listing.paths[i] for i in ids], pa.string()),
            "label": pa.array([listing.labels[i] for i in ids], pa.string()),
            "sha256": pa.array(sha256, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dimension),
        },
        schema=schema(dimension),
    )
    table = table.replace_schema_metadata({"unreadable": json.dumps(unreadable)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def shard_unreadable(path: str | Path) -> list[tuple[int, str]]:
    metadata = pq.read_schema(path).metadata or {}
    return [(int(i), str(e)) for i, e in json.loads(metadata.get(b"unreadable", b"[]"))]


def shard_readable(path: str | Path) -> bool:
    """Whether a shard file is a complete Parquet file (footer and schema readable)."""
    try:
        pq.read_metadata(path)
    except Exception:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        return False
    return True


def write_info(folder: str | Path, info: dict[str, Any]) -> Path:
    return write_text_atomic(Path(folder) / INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_info(folder: str | Path, what: str = "embedding folder") -> dict[str, Any]:
    folder = Path(folder)
    path = folder / INFO
    if not folder.is_dir():
        raise RetrievalError(f"{what} not found: {folder}")
    if not path.is_file():
        raise RetrievalError(f"{folder} is not a complete {what}: it has no {INFO} (an unfinished command? rerun it)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RetrievalError(f"{path} is damaged ({error})") from None


def read_embeddings(folder: str | Path) -> EmbeddingSet:
    """Every row of a complete embedding folder, in id order; checks its digest."""
    info = read_info(folder)
    if info.get("format") != FORMAT:
        raise RetrievalError(f"{folder}: not a dcml embedding folder (format {info.get('format')!r}, want {FORMAT})")
    tables = []
    for number in range(int(info["num_shards"])):
        path = shard_path(folder, number)
        try:
            tables.append(pq.read_table(path, schema=schema(int(info["dimension"]))))
        except Exception as error:  # noqa: BLE001 - missing or damaged shard: one message naming it
            raise RetrievalError(f"cannot read embedding shard {path}: {error}") from None
    table = pa.concat_tables(tables) if tables else schema(int(info["dimension"])).empty_table()
    dimension = int(info["dimension"])
    column = table.column("embedding").combine_chunks()
    embeddings = column.flatten().to_numpy().reshape(-1, dimension).astype(np.float32, copy=False)
    ids = table.column("id").to_numpy().astype(np.int64, copy=False)
    result = EmbeddingSet(
        ids=ids,
        paths=table.column("path").to_pylist(),
        labels=table.column("label").to_pylist(),
        sha256=table.column("sha256").to_pylist(),
        embeddings=embeddings,
        info={**info, "folder": str(folder)},
    )
    if digest(ids, embeddings) != info["digest"]:
        raise RetrievalError(f"{folder}: the shards do not match the digest in {INFO} (files changed or damaged)")
    return result


class Digest:
    """SHA-256 of what an embedding set holds: the ids (int64) and the embeddings (float32)
    in row order, fed in blocks of rows (the result does not depend on the blocks)."""

    def __init__(self) -> None:
        self._ids, self._embeddings = hashlib.sha256(), hashlib.sha256()

    def update(self, ids: np.ndarray, embeddings: np.ndarray) -> None:
        self._ids.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        self._embeddings.update(np.ascontiguousarray(embeddings, dtype=np.float32).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256((self._ids.hexdigest() + self._embeddings.hexdigest()).encode()).hexdigest()


def digest(ids: np.ndarray, embeddings: np.ndarray) -> str:
    """:class:`Digest` of one block."""
    value = Digest()
    value.update(ids, embeddings)
    return value.hexdigest()
