"""Images -> an embedding folder (:mod:`dcml.retrieval.store`), resumable shard by shard.

The listing is fixed first (``listing.parquet``); shard ``s`` holds ids
``[s * rows, (s + 1) * rows)``. Shards are written atomically, so after a crash a rerun
keeps every shard on disk and embeds the rest. ``rows`` is a multiple of the model's
``eval.batch_size``, so images meet the network in the same batches as in the pipeline's
test embedding, which makes the two bit-identical on the CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dcml.atomic import remove_stale_temp_files, write_text_atomic
from dcml.inference import LoadedModel
from dcml.retrieval import RetrievalError, store
from dcml.retrieval.images import HashedImageDataset, Listing

STATE = "state.json"
Progress = Callable[[Iterable, int], Iterable]


def shard_rows(requested: int, batch_size: int) -> int:
    """Rows per shard: ``requested`` rounded up to a multiple of ``batch_size``."""
    if requested < 1:
        raise RetrievalError(f"--shard-size must be >= 1, got {requested}")
    return -(-requested // batch_size) * batch_size


def embed_listing(
    model: LoadedModel,
    listing: Listing,
    out: str | Path,
    *,
    device: torch.device,
    num_workers: int = 0,
    shard_size: int = 8192,
    source: dict[str, Any] | None = None,
    progress: Progress = lambda iterable, total: iterable,
) -> dict[str, Any]:
    """Embed ``listing`` with ``model`` into the folder ``out``; returns its ``info.json``.

    A folder that already holds a complete run of the same model and listing is returned
    as is; one from another model, listing or shard size is refused (exit 2 in the CLI:
    choose another ``--out`` or delete it). ``source``: where the model came from (run
    folder, MLflow URI, MLflow run id), recorded in the info file.
    """
    out = Path(out)
    if len(listing) == 0:
        raise RetrievalError("nothing to embed: the listing is empty")
    rows = shard_rows(shard_size, model.batch_size)
    state = {"model_sha256": model.digest, "listing": _listing_digest(listing), "shard_rows": rows}
    _claim(out, state)
    if (out / store.INFO).is_file():
        return store.read_info(out)
    remove_stale_temp_files(out)
    if not (out / store.LISTING).is_file():
        store.write_listing(out, listing)
    num_shards = -(-len(listing) // rows)
    todo = [s for s in range(num_shards) if not _shard_done(out, s)]
    embedder = model.embedder.to(device).eval()
    shape = (3, model.params.data.image_size, model.params.data.image_size)
    for number in progress(todo, len(todo)):
        ids = range(number * rows, min((number + 1) * rows, len(listing)))
        dataset = HashedImageDataset(listing.paths, ids, model.transform, shape)
        _embed_shard(embedder, dataset, listing, store.shard_path(out, number), device, model, num_workers)
    return _finish(out, model, listing, num_shards, rows, source or {})


def _listing_digest(listing: Listing) -> str:
    return hashlib.sha256(json.dumps([listing.paths, listing.labels]).encode()).hexdigest()


def _claim(out: Path, state: dict[str, Any]) -> None:
    """Record what ``out`` is being filled with; refuse a folder filled with something else."""
    path = out / STATE
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            existing = None
        if existing != state:
            raise RetrievalError(
                f"{out} holds embeddings of another model, image listing or shard size; "
                "choose another --out or delete that folder"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise RetrievalError(f"{out} exists and is not a dcml embedding folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _shard_done(out: Path, number: int) -> bool:
    path = store.shard_path(out, number)
    if not path.is_file():
        return False
    if store.shard_readable(path):
        return True
    path.unlink()  # damaged (not written by this code's atomic writer): embed it again
    return False


@torch.no_grad()
def _embed_shard(embedder, dataset, listing, path, device, model: LoadedModel, num_workers: int) -> None:
    loader = DataLoader(
        dataset,
        batch_size=model.batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    memory_format = torch.channels_last if model.params.train.channels_last else torch.contiguous_format
    ids, hashes, chunks, unreadable = [], [], [], []
    for images, indices, sha256, errors in loader:
        ok = np.array([not error for error in errors], dtype=bool)
        unreadable += [(int(i), e) for i, e, good in zip(indices.tolist(), errors, ok, strict=True) if not good]
        if not ok.any():
            continue
        batch = images if ok.all() else images[torch.from_numpy(ok)]
        output = embedder(batch.to(device, non_blocking=True, memory_format=memory_format))
        chunks.append(output.float().cpu().numpy())
        ids += [i for i, good in zip(indices.tolist(), ok, strict=True) if good]
        hashes += [h for h, good in zip(sha256, ok, strict=True) if good]
    embeddings = np.concatenate(chunks) if chunks else np.empty((0, model.dimension), np.float32)
    store.write_shard(path, np.asarray(ids, np.int64), listing, hashes, embeddings, unreadable)


def _finish(out: Path, model: LoadedModel, listing: Listing, num_shards: int, rows: int, source: dict) -> dict:
    """Unreadable list, digest over all shards, then ``info.json`` (the completion mark)."""
    digest, count, unreadable = store.Digest(), 0, []
    for number in range(num_shards):
        path = store.shard_path(out, number)
        table = store.pq.read_table(path, columns=["id", "embedding"])
        ids = table.column("id").to_numpy()
        emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, model.dimension)
        digest.update(ids, emb)
        count += len(ids)
        unreadable += store.shard_unreadable(path)
    lines = "".join(f"{listing.paths[i]}\t{error}\n" for i, error in unreadable)
    write_text_atomic(out / store.UNREADABLE, lines)
    if count == 0:
        raise RetrievalError(
            f"none of the {len(listing)} images of {listing.source} could be read (see {out / store.UNREADABLE})"
        )
    info = {
        "format": store.FORMAT,
        "count": count,
        "num_listed": len(listing),
        "num_unreadable": len(unreadable),
        "dimension": model.dimension,
        "num_shards": num_shards,
        "shard_rows": rows,
        "digest": digest.hexdigest(),
        "labels": listing.has_labels,
        "images": listing.source,
        "model": {**model.describe(), **source},
        "learners": model.subspaces(),
    }
    store.write_info(out, info)
    return info
