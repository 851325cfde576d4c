"""The only module that talks to MLflow.

One experiment per dataset (``dcml-<dataset>`` unless ``tracking.experiment`` is set);
a sweep is a parent run with one child run per (K, seed). Runs are addressed by id
with :class:`~mlflow.tracking.MlflowClient`, so a resumed flow continues its run.

Only run-level operations are Prefect tasks (``start-tracking``, ``log-artifacts``,
``log-model``, ``end-tracking``, ``log-summary``, ``register-model``): per-epoch,
division and evaluation numbers are logged by plain functions (:func:`log_metrics`,
:func:`log_metrics_from`, :func:`log_dataset`) that the flow calls after the task that
produced them, so the flow-run graph shows the cluster/train alternation, not one node
per logged step. Each logging call is recorded in the run's state file and skipped when
a resumed flow repeats it.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from dcml.clustering import NMI_AVERAGE_METHOD
from dcml.config import ConfigError, Params, flatten, redact_uri, split_uri_credentials
from dcml.inference import TestEmbedder
from tasks import io, provenance, report

PIP_REQUIREMENTS = ["torch>=2.4", "torchvision>=0.19", "numpy>=1.26"]
# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says otherwise
# (the value the UI's experiment-type selector writes; mlflow/server/js: CUSTOM_MODEL_DEVELOPMENT)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
BEST_ALIAS = "best"


def client(params: Params) -> MlflowClient:
    return MlflowClient(tracking_uri=connection_uri(params))


def connection_uri(params: Params) -> str:
    """The tracking URI handed to MLflow. Credentials in an http(s) URI move to
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (MLflow sends them as basic auth), so
    that MLflow never prints them ("View run ... at <uri>")."""
    uri = params.tracking.mlflow_uri
    if not uri.lower().startswith(("http://", "https://")):
        return uri  # database URIs need their credentials; MLflow does not print them
    bare, user, password = split_uri_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        if password is not None:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return bare


def check_tracking_uri(uri: str) -> None:
    """Fail unless MLflow has a tracking store for ``uri``'s scheme (its own registry,
    plugins included) — before any server starts. Raises :class:`ConfigError`."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # MLflow's own registry
    from mlflow.utils.uri import get_uri_scheme

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        schemes = sorted(s for s in _tracking_store_registry._registry if s)
        raise ConfigError(
            f"tracking.mlflow_uri: MLflow has no tracking store for {redact_uri(uri)!r}; use a file path or "
            f"one of the schemes {schemes} (e.g. sqlite:///mlflow.db or http://host:5000)"
        ) from None
    is_file_store = uri not in {"databricks", "databricks-uc", "uc"} and get_uri_scheme(uri) in ("", "file")
    if is_file_store and not MLFLOW_ALLOW_FILE_STORE.get():
        raise ConfigError(
            f"tracking.mlflow_uri: {uri!r} is a file store, which this MLflow refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlflow.db instead"
        )


def experiment_id(params: Params) -> str:
    """Get or create the dataset's experiment (local artifacts live next to the sqlite DB)."""
    mlflow_client = client(params)
    name = experiment_name(params)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # created by an older dcml
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    uri = params.tracking.mlflow_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def experiment_name(params: Params) -> str:
    return params.tracking.experiment or f"dcml-{params.data.dataset}"


def code_tags() -> dict[str, str]:
    """The current code version as tags: MLflow's standard source tag and dcml's digest
    (``<run>/code_versions.json``, logged as ``history/code``, has the run's history)."""
    version = provenance.code_version()
    return {
        "git_commit": version["git_commit"],
        "mlflow.source.git.commit": version["git_commit"].removesuffix("+dirty"),
        "dcml.source_digest": version["source_digest"],
        **source_tags(),
    }


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags (what the UI shows as *Source* and *User*) and, in a
    Prefect flow, the flow run that wrote the run."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        user = "unknown"
    tags = {"mlflow.source.name": "dcml", "mlflow.source.type": "LOCAL", "mlflow.user": user}
    if flow_run.get_id():
        tags["prefect.flow_run_id"] = str(flow_run.get_id())
        tags["prefect.flow_run_name"] = str(flow_run.get_name())
    return tags


def _retrying(action: Callable[[], Any], attempts: int = 3, delay: float = 2.0) -> Any:
    """What the task retries did for the logging that is no longer a task: a tracking
    server that is briefly unreachable does not fail the run."""
    for attempt in range(attempts):
        try:
            return action()
        except (MlflowException, OSError) as error:
            if attempt == attempts - 1:
                raise
            logging.getLogger(__name__).warning("MLflow call failed (%s); retrying in %.0f s", error, delay)
            time.sleep(delay)
    return None


def _state_matches(state: dict[str, Any], params: Params, parent_run_id: str | None) -> bool:
    return (
        state.get("tracking_uri") == redact_uri(params.tracking.mlflow_uri)
        and state.get("parent_run_id") == parent_run_id
        and state.get("params_digest") == _digest(params)
    )


def _digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_exists(mlflow_client: MlflowClient, run_id: str) -> bool:
    try:
        return mlflow_client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _tracking_task(name: str, run_name: str):
    """A Prefect task that talks to MLflow: retried twice (a busy server), never cached."""
    return task(
        name=name, task_run_name=run_name, retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, tags=["tracking"]
    )


@_tracking_task("start-tracking", "start-tracking-{run_name}")
def start_run(
    params: Params,
    run_name: str,
    state_file: str,
    parent_run_id: str | None = None,
    reuse_from: str | None = None,
    reuse_key: str | None = None,
) -> str:
    """Create the MLflow run, or reopen the one ``state_file`` names; returns its id.

    The saved run is reopened only if it still exists in the same tracking store, under
    the same parent, for the same params; otherwise (a deleted ``mlflow.db``, another
    URI, a run folder reused by a new sweep) a new run is created and the flow logs its
    history again from disk. Without a ``state_file``, the state in ``reuse_from`` (a
    finished sweep's, :func:`remember_finished`) is taken over when its ``reuse_key``
    is ``reuse_key``: a sweep that recomputes nothing reopens the previous parent run
    (and its children theirs) instead of adding identical runs.
    """
    state_path = Path(state_file)
    mlflow_client = client(params)
    state = io.read_json(state_path) if state_path.is_file() else {}
    if not state and reuse_from and reuse_key and Path(reuse_from).is_file():
        previous = io.read_json(reuse_from)
        if previous.get("reuse_key") == reuse_key:
            state = previous
            io.write_json(state_path, state)
    if state and _state_matches(state, params, parent_run_id) and _run_exists(mlflow_client, state["run_id"]):
        run_id = state["run_id"]
        mlflow_client.update_run(run_id, status="RUNNING")
        for key, value in code_tags().items():  # the code that continues the run
            mlflow_client.set_tag(run_id, key, value)
    else:
        tags = {
            "mlflow.runName": run_name,
            "dataset": params.data.dataset,
            "dataset_version": provenance.dvc_version(params.data.root),
            "num_learners": str(params.cluster.num_learners),
            "nmi_average_method": NMI_AVERAGE_METHOD,
        }
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = mlflow_client.create_run(
            experiment_id(params), run_name=run_name, tags={**tags, **code_tags()}
        ).info.run_id
        state = {
            "run_id": run_id,
            "tracking_uri": redact_uri(params.tracking.mlflow_uri),  # never a password on disk
            "parent_run_id": parent_run_id,
            "params_digest": _digest(params),
            "done": [],
        }
        io.write_json(state_path, state)  # before anything else, so a retry reopens this run
    if "params" not in state["done"]:
        # MLflow accepts at most 100 params per batch; re-logging equal values is allowed.
        items = sorted(flatten(params).items())
        for start in range(0, len(items), 100):
            mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in items[start : start + 100]])
        _mark_done(state_path, "params")
    return run_id


def remember_finished(state_file: str, record: str, reuse_key: str) -> None:
    """Keep a finished sweep's parent-run state in ``record`` for :func:`start_run`'s ``reuse_from``."""
    io.write_json(record, {**io.read_json(state_file), "reuse_key": reuse_key})


def _mark_done(state_file: str | Path, key: str, **values: Any) -> None:
    state = io.read_json(state_file)
    state["done"].append(key)
    state.update(values)
    io.write_json(state_file, state)


def _is_done(state_file: str | Path, key: str) -> bool:
    return key in io.read_json(state_file)["done"]


def log_metrics(params: Params, run_id: str, epoch: int, metrics: dict[str, float], state_file: str) -> None:
    """Log metrics at ``step=epoch`` once (a resumed flow does not log a step twice).
    A plain function, not a task: no graph node per logged step."""
    key = f"metrics:{epoch}:{','.join(sorted(metrics))}"
    if _is_done(state_file, key):
        return
    now = get_current_time_millis()
    batch = [Metric(_metric_key(k), float(v), now, epoch) for k, v in metrics.items() if np.isfinite(v)]
    _retrying(lambda: client(params).log_batch(run_id, metrics=batch))
    _mark_done(state_file, key)


def log_dataset(params: Params, run_id: str, counts: dict[str, float], state_file: str) -> None:
    """The run's data as an MLflow dataset input (*Datasets used* in the UI): digest =
    the data version (DVC's hash of the folder when a ``.dvc`` file tracks it, else a
    digest of the split's file list, :func:`tasks.provenance.data_version`), source =
    ``data.root``, the image/class counts as its profile and as ``data_counts.*``
    params — constants, so no metric charts. Once per run."""
    if _is_done(state_file, "dataset"):
        return
    version = provenance.data_version(params.data)
    digest = version.removeprefix("dvc:")[:36]  # MLflow's limit; a DVC folder hash is 36
    profile = {key: int(value) for key, value in counts.items()}
    dataset = Dataset(
        name=params.data.dataset,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": str(Path(params.data.root).resolve()), "data_version": version}),
        profile=json.dumps(profile),
    )
    tags = [InputTag("mlflow.data.context", "training")]
    mlflow_client = client(params)
    _retrying(lambda: mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)]))
    count_params = [Param(f"data_counts.{key}", str(value)) for key, value in sorted(profile.items())]
    _retrying(lambda: mlflow_client.log_batch(run_id, params=count_params))
    _mark_done(state_file, "dataset")


def log_metrics_from(
    params: Params, run_id: str, step: int, path: str, kind: str, state_file: str, keys: list[str] | None = None
) -> None:
    """Log the numbers of a task's output — a JSON file, or a division's stats — at ``step``
    as ``<kind>/<name>`` metrics."""
    data = io.read_division(path).stats if path.endswith(".parquet") else io.read_json(path)
    numbers = {
        f"{kind}/{key}": float(value)
        for key, value in data.items()
        if isinstance(value, int | float) and key != "epoch" and (keys is None or key in keys)
    }
    log_metrics(params, run_id, step, numbers, state_file)


def _metric_key(name: str) -> str:
    return name.replace("@", "_at_")


@contextlib.contextmanager
def system_metrics(params: Params, run_id: str) -> Iterator[None]:
    """MLflow's system metrics (CPU, RAM, disk, network; GPU with ``nvidia-ml-py``) for
    ``run_id`` while the block runs — the monitor that ``mlflow.start_run`` would start,
    here for a run handled by id. Every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    seconds (default 10); ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns it off."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    monitor = None
    if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set() and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=connection_uri(params))
        monitor.start()
    except Exception as error:  # noqa: BLE001 - never fail a run for its monitoring
        logging.getLogger(__name__).warning("no MLflow system metrics: %s", error)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def run_link(params: Params, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server, or — for a local store —
    at ``make mlflow-ui``'s address."""
    uri = redact_uri(params.tracking.mlflow_uri)
    base = uri.rstrip("/") if uri.lower().startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    base = split_uri_credentials(base)[0]
    experiment = client(params).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


@_tracking_task("log-artifacts", "log-artifacts")
def log_artifacts(params: Params, run_id: str, files: dict[str, str], state_file: str) -> None:
    """``files`` maps an artifact folder to a local file or folder; logged once per run."""
    if _is_done(state_file, "artifacts"):
        return
    mlflow_client = client(params)
    for artifact_path, local in files.items():
        if Path(local).is_dir():
            mlflow_client.log_artifacts(run_id, local, artifact_path)
        elif Path(local).is_file():
            mlflow_client.log_artifact(run_id, local, artifact_path)
    _mark_done(state_file, "artifacts")


@task(name="log-model", task_run_name="log-model", retries=1, cache_policy=NO_CACHE, tags=["tracking"])
def log_model(params: Params, run_id: str, checkpoint: str, state_file: str) -> dict[str, str | None]:
    """The final models, logged at ``step = train.epochs``, so each LoggedModel carries the
    final epoch's metrics (MLflow links the run's metrics of that step to the model), with
    explicit pip requirements (inference of requirements is slow):

    - ``model``: ``mlflow.pytorch.log_model``, pt2 export of ``images -> embedding``
      (float32 tensors, the caller preprocesses);
    - ``image-model``: :mod:`tasks.image_model`, a pyfunc taking encoded image files (a
      ``binary`` column ``image``) with the evaluation preprocessing inside — what the
      registered model's alias ``best`` serves (:func:`register_best`).

    Returns ``{"model_id": ..., "image_model_id": ...}`` (kept in the state file; ``None``
    for a model logged by an older dcml). Each is logged once per run.

    The embedding is the checkpoint's test embedding, as the pipeline evaluated it
    (:class:`dcml.inference.TestEmbedder`: its number of separately normalised slices,
    also in the models' metadata as ``num_slices``)."""
    from tasks import image_model  # the pyfunc: imports mlflow.pyfunc, PIL, pandas

    model_params = {"num_learners": str(params.cluster.num_learners), "seed": str(params.seed)}
    if not (_is_done(state_file, "model") and _is_done(state_file, "image_model")):
        mlflow.set_tracking_uri(connection_uri(params))
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            if not _is_done(state_file, "model"):
                model = TestEmbedder.from_checkpoint(checkpoint, torch.device("cpu"))
                size = params.data.image_size
                example = np.zeros((2, 3, size, size), dtype=np.float32)
                with torch.no_grad():
                    output = model(torch.from_numpy(example)).numpy()
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=infer_signature(example, output),
                    input_example=example,
                    pip_requirements=PIP_REQUIREMENTS,
                    serialization_format="pt2",
                    metadata={"num_slices": model.num_slices},
                    step=params.train.epochs,
                    params=model_params,
                )
                _mark_done(state_file, "model", model_id=info.model_id)
            if not _is_done(state_file, "image_model"):
                info = image_model.log_image_model(
                    checkpoint, step=params.train.epochs, pip_requirements=PIP_REQUIREMENTS, params=model_params
                )
                _mark_done(state_file, "image_model", image_model_id=info.model_id)
    state = io.read_json(state_file)
    return {"model_id": state.get("model_id"), "image_model_id": state.get("image_model_id")}


@_tracking_task("end-tracking", "end-tracking-{run_name}")
def end_run(params: Params, run_id: str, run_name: str, status: str = "FINISHED") -> None:
    client(params).set_terminated(run_id, status=status)


def mark_failed(params: Params, run_id: str, run_name: str) -> None:
    """Best effort, while another error propagates: never hide that error."""
    try:
        client(params).set_terminated(run_id, status="FAILED")
    except Exception as error:  # noqa: BLE001 - the original error matters more
        logging.getLogger(__name__).warning("could not mark MLflow run %s (%s) failed: %s", run_name, run_id, error)


@_tracking_task("log-summary", "log-summary")
def log_summary(params: Params, run_id: str, summary: dict[str, Any], state_file: str) -> None:
    """A comparison's statistics over seeds (``tasks.report.summary_of``) on the sweep's
    parent run at step 0: ``<variant>/<metric>_mean`` and ``_std``, and for K > 1
    ``_diff_vs_K1``, ``_ci_low``, ``_ci_high``; ``K=4 masks`` becomes ``K4_masks`` and
    ``recall@1`` ``recall_at_1`` (MLflow names allow neither ``=`` nor ``@``). Numbers
    that do not exist (one seed: no std, no interval) are not logged."""
    fields = {
        "summary": {"mean": "mean", "std": "std"},
        "vs_K1": {"diff": "diff_vs_K1", "ci_low": "ci_low", "ci_high": "ci_high"},
    }
    numbers = {}
    for section, suffixes in fields.items():
        for variant, by_metric in summary[section].items():
            prefix = variant.replace("=", "").replace(" ", "_")
            for metric, values in by_metric.items():
                for field, suffix in suffixes.items():
                    if values[field] is not None and np.isfinite(values[field]):
                        numbers[f"{prefix}/{_metric_key(metric)}_{suffix}"] = float(values[field])
    key = "summary:" + hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]
    if _is_done(state_file, key):
        return
    now = get_current_time_millis()
    batch = [Metric(name, value, now, 0) for name, value in sorted(numbers.items())]
    mlflow_client = client(params)
    for start in range(0, len(batch), 1000):  # MLflow's limit per batch
        mlflow_client.log_batch(run_id, metrics=batch[start : start + 1000])
    _mark_done(state_file, key)


@_tracking_task("register-model", "register-model")
def register_best(params: Params, results: list[dict[str, Any]], parent_run_id: str) -> dict[str, Any] | None:
    """The experiment's registered model (named like the experiment) gets the best K of
    this sweep as a version with the alias ``best``: the K with the highest mean R@1
    over seeds, and of its runs the one with the highest R@1. The version is the run's
    image model (``image-model``: encoded image files in, so ``mlflow models serve -m
    models:/<name>@best`` serves images). ``results`` are the runs' flow results
    (``num_learners``, ``seed``, ``recall@1``, ``mlflow_run_id``, ``image_model_id``).
    An existing version of the same model is reused. Returns the version, K, seed and
    R@1, or ``None`` when no model was logged."""
    best = report.best_of([r for r in results if r.get("image_model_id")])  # the one rule (best.json too)
    if best is None:
        return None
    best_k = int(best["num_learners"])
    mlflow_client = client(params)
    name = experiment_name(params)
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        mlflow_client.create_registered_model(
            name,
            description=f"dcml embedding models of experiment {name}; alias '{BEST_ALIAS}': best K of the latest sweep",
        )
    source = f"models:/{best['image_model_id']}"  # (a sqlite registry reads model_id back as None)
    existing = [v for v in mlflow_client.search_model_versions(f"name='{name}'") if v.source == source]
    if existing:
        version = existing[0]
    else:
        version = mlflow_client.create_model_version(
            name,
            source=source,
            run_id=best["mlflow_run_id"],
            model_id=best["image_model_id"],
            tags={"num_learners": str(best_k), "seed": str(best["seed"]), "sweep_run_id": parent_run_id},
        )
    mlflow_client.set_model_version_tag(name, version.version, "recall_at_1", f"{best['recall@1']:.6f}")
    mlflow_client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    return {
        "name": name,
        "version": version.version,
        "num_learners": best_k,
        "seed": best["seed"],
        "recall@1": float(best["recall@1"]),
    }
