"""faiss index folders: build, save, load and search an inner-product index.

Layout of ``IDX``::

    index.faiss   the faiss index (a CPU index, whatever device built it)
    ids.parquet   position -> id, path, label, sha256 (row i describes the index's vector i)
    info.json     factory, metric, count, dimension, model, embedding digest, learners

Vectors are the embeddings L2-normalised, so inner product is cosine similarity and the
ranking equals the pipeline's Euclidean ranking. A folder is written under a temporary
name and renamed, so an index folder that exists is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcml.atomic import UMASK
from dcml.faiss_backend import gpu_device, gpu_resources, normalized_rows, resolve_use_gpu
from dcml.retrieval import RetrievalError
from dcml.retrieval.store import EmbeddingSet, write_info

FORMAT = "dcml-index/1"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vectors`` (n, d) with unit rows (zero rows stay zero)."""
    if np.ndim(vectors) != 2:
        raise RetrievalError(f"embeddings must be 2-D (n, d), got shape {np.shape(vectors)}")
    return normalized_rows(vectors)


def make_index(vectors: np.ndarray, factory: str = "Flat", *, use_gpu: bool | None = None) -> tuple[faiss.Index, str]:
    """A trained, filled CPU inner-product index of ``vectors`` (already normalised) and
    the device that built it (``"gpu"`` when faiss-gpu is present and the index type has a
    GPU version, else ``"cpu"``)."""
    dimension = vectors.shape[1]
    try:
        index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else str(error)
        raise RetrievalError(f"--factory {factory!r} is not a faiss index_factory string ({message})") from None
    built_on = "cpu"
    work = index
    if resolve_use_gpu(use_gpu):
        try:
            work = faiss.index_cpu_to_gpu(gpu_resources(), gpu_device(), index)
            built_on = "gpu"
        except RuntimeError:  # no GPU version of this index type (e.g. HNSW): build on the CPU
            if use_gpu:
                raise
    if not work.is_trained:
        if len(vectors) < _min_training_points(index):
            raise RetrievalError(
                f"--factory {factory!r} needs at least {_min_training_points(index)} vectors to train, "
                f"the embeddings hold {len(vectors)}; use Flat or fewer lists"
            )
        work.train(vectors)
    work.add(vectors)
    return (faiss.index_gpu_to_cpu(work) if built_on == "gpu" else work), built_on


def _min_training_points(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 1


@dataclass
class IndexFolder:
    """A loaded index folder: ``index``, its ``rows`` (ids, paths, labels, sha256) and ``info``."""

    path: Path
    index: faiss.Index
    ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    sha256: list[str]
    info: dict[str, Any]

    @property
    def dimension(self) -> int:
        return int(self.index.d)

    @property
    def exact(self) -> bool:
        """Whether search is exhaustive over the stored vectors (a ``Flat`` index)."""
        return self.info["factory"].replace(" ", "") in ("Flat", "IDMap,Flat")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (n, k) cosine, positions (n, k) int64; -1 where fewer than k found)``."""
        queries = normalized(queries)
        if queries.shape[1] != self.dimension:
            raise RetrievalError(
                f"queries have dimension {queries.shape[1]}, the index at {self.path} {self.dimension}"
            )
        k = min(k, self.index.ntotal)
        scores, positions = self.index.search(queries, k)
        return scores, positions.astype(np.int64, copy=False)

    def vectors(self) -> np.ndarray:
        """The stored (normalised) vectors, decoded: exact for Flat/HNSW-Flat/IVF-Flat, the
        codes' reconstruction for compressed indexes (PQ, SQ)."""
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.make_direct_map()
        return self.index.reconstruct_n(0, self.index.ntotal)


def set_search_parameters(index: faiss.Index, parameters: str) -> None:
    """Apply faiss search parameters, e.g. ``nprobe=16`` (IVF) or ``efSearch=128`` (HNSW),
    comma-separated (faiss ``ParameterSpace`` syntax); ``""`` leaves faiss's defaults."""
    if not parameters:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, parameters)
    except RuntimeError as error:
        raise RetrievalError(
            f"search parameters {parameters!r} do not apply to this index ({_last_line(error)})"
        ) from None


def build_index_folder(
    embeddings: EmbeddingSet,
    out: str | Path,
    factory: str = "Flat",
    *,
    use_gpu: bool | None = None,
    search_parameters: str = "",
) -> dict[str, Any]:
    """Build an index over ``embeddings`` and write the folder ``out`` (replaced if it exists);
    returns its info. ``search_parameters`` (e.g. ``nprobe=16``) are checked and recorded:
    every search of the folder applies them unless told otherwise."""
    out = Path(out)
    if len(embeddings) == 0:
        raise RetrievalError("the embedding folder holds no embeddings")
    index, built_on = make_index(normalized(embeddings.embeddings), factory, use_gpu=use_gpu)
    set_search_parameters(index, search_parameters)
    source = embeddings.info
    info = {
        "format": FORMAT,
        "factory": factory,
        "search_parameters": search_parameters,
        "metric": "inner_product",
        "normalized": True,
        "count": int(index.ntotal),
        "dimension": int(index.d),
        "built_on": built_on,
        "faiss_version": faiss.__version__,
        "embeddings": {"folder": str(source.get("folder", "")), "digest": source["digest"]},
        "labels": bool(source.get("labels")),
        "model": source["model"],
        "learners": source["learners"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        table = pa.table(
            {
                "id": pa.array(embeddings.ids, pa.int64()),
                "path": pa.array(embeddings.paths, pa.string()),
                "label": pa.array(embeddings.labels, pa.string()),
                "sha256": pa.array(embeddings.sha256, pa.string()),
            }
        )
        pq.write_table(table, tmp / IDS_FILE)
        write_info(tmp, info)
        os.chmod(tmp, 0o777 & ~UMASK)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then deleted."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def load_index_folder(path: str | Path, search_parameters: str | None = None) -> IndexFolder:
    """Load and check an index folder; :class:`RetrievalError` names what is wrong. The
    search parameters are ``search_parameters`` when given, else those recorded at build."""
    from dcml.retrieval.store import read_info

    path = Path(path)
    info = read_info(path, "index folder")
    if info.get("format") != FORMAT:
        raise RetrievalError(f"{path}: not a dcml index folder (format {info.get('format')!r}, want {FORMAT})")
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise RetrievalError(f"index file missing: {index_file}")
    try:
        index = faiss.read_index(str(index_file))
    except RuntimeError as error:
        raise RetrievalError(f"cannot read the faiss index {index_file} (damaged?): {_last_line(error)}") from None
    try:
        table = pq.read_table(path / IDS_FILE)
    except Exception as error:  # noqa: BLE001 - missing or damaged sidecar
        raise RetrievalError(f"cannot read the ID sidecar {path / IDS_FILE}: {error}") from None
    if not (index.ntotal == table.num_rows == info["count"]) or index.d != info["dimension"]:
        raise RetrievalError(
            f"{path}: the index ({index.ntotal} x {index.d}), its sidecar ({table.num_rows} rows) and "
            f"info.json ({info['count']} x {info['dimension']}) disagree"
        )
    chosen = info.get("search_parameters", "") if search_parameters is None else search_parameters
    set_search_parameters(index, chosen)
    info = {**info, "search_parameters": chosen}
    return IndexFolder(
        path=path,
        index=index,
        ids=table.column("id").to_numpy(),
        paths=table.column("path").to_pylist(),
        labels=table.column("label").to_pylist(),
        sha256=table.column("sha256").to_pylist(),
        info=info,
    )


def _last_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def project(vectors: np.ndarray, learner: dict[str, Any]) -> np.ndarray:
    """Learner sub-space of normalised test embeddings (``dcml.inference.learner_subspaces``)."""
    if learner["kind"] == "slice":
        part = vectors[:, learner["start"] : learner["stop"]]
    elif learner["kind"] == "mask":
        part = vectors * np.asarray(learner["weights"], dtype=np.float32)[None, :]
    else:
        raise RetrievalError(f"unknown learner sub-space kind {learner['kind']!r}")
    return normalized(part)


def learner_of(info: dict[str, Any], learner: int) -> dict[str, Any]:
    learners = info["learners"]
    if not 0 <= learner < len(learners):
        raise RetrievalError(
            f"--learner {learner}: the model has {len(learners)} learner sub-space(s), 0..{len(learners) - 1}"
        )
    return learners[learner]
