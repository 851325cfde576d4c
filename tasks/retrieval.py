"""Prefect tasks of the retrieval chain (embed -> index -> evaluate). Paths in, paths out.

Each wraps one :mod:`dcml.retrieval` call. The ``dcml`` commands call the plain functions
(``.fn``: no Prefect server for a one-off command); ``flows.retrieval`` chains the tasks.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dcml.atomic import write_text_atomic
from dcml.data import load_splits
from dcml.device import resolve_device, resolve_num_workers
from dcml.inference import load_model
from dcml.retrieval import RetrievalError, images, store
from dcml.retrieval.embedding import embed_listing
from dcml.retrieval.evaluate import evaluate_index as evaluate_through_index
from dcml.retrieval.index import build_index_folder, load_index_folder
from tasks.models import resolve_model
from tasks.progress import bar

SPLITS = ("train", "test", "query", "gallery")


def listing_for(model_params, image_source: str | None, split: str | None) -> images.Listing:
    """IMAGES (a folder or list file) or ``split`` of the model's own dataset."""
    if (image_source is None) == (split is None):
        raise RetrievalError("give IMAGES (a folder or a list file) or --split, not both or neither")
    if image_source is not None:
        return images.list_images(image_source)
    splits = load_splits(model_params.data)
    records = getattr(splits, split)
    if records is None:
        raise RetrievalError(f"--split {split}: dataset {model_params.data.dataset} has no {split} split")
    return images.split_listing(records, f"{model_params.data.dataset}:{model_params.data.root}:{split}")


@task(name="embed-images", task_run_name="embed-images", cache_policy=NO_CACHE, tags=["retrieval"])
def embed_images(
    model: str,
    out: str,
    image_source: str | None = None,
    split: str | None = None,
    device: str = "auto",
    num_workers: int | str = "auto",
    shard_size: int = 8192,
    params_path: str = "params.yaml",
) -> str:
    """``dcml embed``: MODEL (``tasks.models``) applied to the images; returns ``out``."""
    source = resolve_model(model, params_path)
    torch_device = resolve_device(device)
    loaded = load_model(source.checkpoint, torch_device)
    listing = listing_for(loaded.params, image_source, split)
    workers = resolve_num_workers(num_workers, torch_device)
    embed_listing(
        loaded,
        listing,
        out,
        device=torch_device,
        num_workers=workers,
        shard_size=shard_size,
        source=source.record,
        progress=bar("embed shards"),
    )
    return out


@task(name="build-index", task_run_name="build-index", cache_policy=NO_CACHE, tags=["retrieval"])
def build_index(
    embeddings: str, out: str, factory: str = "Flat", device: str = "auto", search_parameters: str = ""
) -> str:
    """``dcml index build``: a faiss index folder over an embedding folder; returns ``out``."""
    use_gpu = {"auto": None, "cpu": False, "cuda": True}[device]
    build_index_folder(
        store.read_embeddings(embeddings), out, factory, use_gpu=use_gpu, search_parameters=search_parameters
    )
    return out


@task(name="evaluate-index", task_run_name="evaluate-index", cache_policy=NO_CACHE, tags=["retrieval"])
def evaluate_index(
    index: str,
    queries: str,
    ks: list[int] | None = None,
    out: str | None = None,
    log_to_mlflow: bool = True,
    params_path: str = "params.yaml",
    search_parameters: str | None = None,
) -> dict[str, Any]:
    """``dcml index eval``: metrics through the saved index at ``ks`` (default: the model's
    ``eval.recall_ks``); written to ``out`` (JSON) and
    logged to the model's MLflow run (``index/<metric>``) when it has one."""
    folder = load_index_folder(index, search_parameters)
    query_set = store.read_embeddings(queries)
    exact = None
    if not folder.exact:
        source = folder.info["embeddings"]["folder"]
        exact = store.read_embeddings(source)
        if exact.info["digest"] != folder.info["embeddings"]["digest"]:
            raise RetrievalError(f"{source} no longer holds the embeddings the index {index} was built from")
    ks = ks or folder.info["model"].get("recall_ks") or [1, 2, 4, 8]  # default: as the run evaluated
    metrics = evaluate_through_index(folder, query_set, ks, exact_embeddings=exact)
    result = {"index": str(index), "queries": str(queries), "search_parameters": folder.info["search_parameters"]}
    result.update(metrics)
    if out:
        write_text_atomic(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    run_id = folder.info["model"].get("mlflow_run_id")
    if log_to_mlflow and run_id:
        result["mlflow_run_id"] = run_id
        _log_metrics(run_id, metrics, params_path)
    return result


def _log_metrics(run_id: str, metrics: dict[str, Any], params_path: str) -> None:
    """``index/<metric>`` (``recall@1`` -> ``index/recall_at_1``) on the model's MLflow run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    from tasks.models import tracking_uri
    from tasks.tracking import _metric_key as metric_key

    now = get_current_time_millis()
    numbers = [
        Metric(f"index/{metric_key(name)}", float(value), now, 0)
        for name, value in sorted(metrics.items())
        if isinstance(value, float | int) and not isinstance(value, bool)
    ]
    MlflowClient(tracking_uri(params_path)).log_batch(run_id, metrics=numbers)
