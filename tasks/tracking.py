"""The only module that talks to MLflow.

One experiment per dataset (``dcml-<dataset>`` unless ``tracking.experiment`` is set);
a sweep is a parent run with one child run per (K, seed). Runs are addressed by id
with :class:`~mlflow.tracking.MlflowClient`, so a resumed flow continues its run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow.entities import Metric, Param
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from prefect import task

from dcml.config import Params, flatten
from dcml.trainer import Trainer
from tasks import io

PIP_REQUIREMENTS = ["torch>=2.4", "torchvision>=0.19", "numpy>=1.26"]


def client(params: Params) -> MlflowClient:
    return MlflowClient(tracking_uri=params.tracking.mlflow_uri)


def experiment_id(params: Params) -> str:
    """Get or create the dataset's experiment (local artifacts live next to the sqlite DB)."""
    mlflow_client = client(params)
    name = params.tracking.experiment or f"dcml-{params.data.dataset}"
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    uri = params.tracking.mlflow_uri
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_version(data_root: str) -> str:
    """The DVC hash of the dataset folder, read from the ``.dvc`` file that tracks it."""
    root = Path(data_root).resolve()
    candidates = [Path("data.dvc"), root.with_name(root.name + ".dvc")]
    for dvc_file in candidates:
        if not dvc_file.is_file():
            continue
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
            if (dvc_file.parent / out.get("path", "")).resolve() == root:
                return str(out.get("md5", "unknown"))
    return "untracked"


@task(name="start-tracking", task_run_name="start-tracking-{run_name}", retries=2, retry_delay_seconds=2)
def start_run(params: Params, run_name: str, state_file: str, parent_run_id: str | None = None) -> str:
    """Create the MLflow run, or reopen the one ``state_file`` names; returns its id.

    A run folder reused by another sweep (same params, new parent) gets a new child run
    under the new parent; the flow then logs its history again from disk.
    """
    state = Path(state_file)
    mlflow_client = client(params)
    if state.is_file():
        previous = io.read_json(state)
        if previous.get("parent_run_id") == parent_run_id:
            mlflow_client.update_run(previous["run_id"], status="RUNNING")
            return previous["run_id"]
    tags = {
        "mlflow.runName": run_name,
        "git_commit": git_commit(),
        "dataset": params.data.dataset,
        "dataset_version": dataset_version(params.data.root),
        "num_learners": str(params.cluster.num_learners),
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id(params), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    # MLflow accepts at most 100 params per batch.
    items = sorted(flatten(params).items())
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in items[start : start + 100]])
    io.write_json(state, {"run_id": run_id, "parent_run_id": parent_run_id, "logged_epochs": []})
    return run_id


@task(name="log-metrics", task_run_name="log-metrics-epoch-{epoch}", retries=2, retry_delay_seconds=2)
def log_metrics(params: Params, run_id: str, epoch: int, metrics: dict[str, float], state_file: str) -> None:
    """Log metrics at ``step=epoch`` once (a resumed flow does not log a step twice)."""
    state = io.read_json(state_file)
    key = f"{epoch}:{','.join(sorted(metrics))}"
    if key in state["logged_epochs"]:
        return
    now = get_current_time_millis()
    batch = [Metric(_metric_key(k), float(v), now, epoch) for k, v in metrics.items() if np.isfinite(v)]
    client(params).log_batch(run_id, metrics=batch)
    state["logged_epochs"].append(key)
    io.write_json(state_file, state)


def _metric_key(name: str) -> str:
    return name.replace("@", "_at_")


@task(name="log-artifacts", task_run_name="log-artifacts", retries=2, retry_delay_seconds=2)
def log_artifacts(params: Params, run_id: str, files: dict[str, str]) -> None:
    """``files`` maps an artifact folder to a local file or folder."""
    mlflow_client = client(params)
    for artifact_path, local in files.items():
        if Path(local).is_dir():
            mlflow_client.log_artifacts(run_id, local, artifact_path)
        elif Path(local).is_file():
            mlflow_client.log_artifact(run_id, local, artifact_path)


@task(name="log-model", task_run_name="log-model", retries=1)
def log_model(params: Params, run_id: str, checkpoint: str) -> None:
    """Final model via ``mlflow.pytorch.log_model``: pt2 export of ``images -> embedding``
    with a signature and explicit pip requirements (inference of requirements is slow)."""
    model = Trainer.from_checkpoint(checkpoint, device=torch.device("cpu")).model.eval()
    size = params.data.image_size
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(params.tracking.mlflow_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
        )


@task(name="end-tracking", task_run_name="end-tracking-{run_name}", retries=2, retry_delay_seconds=2)
def end_run(params: Params, run_id: str, run_name: str, status: str = "FINISHED") -> None:
    client(params).set_terminated(run_id, status=status)
