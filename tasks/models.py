"""Where a model to embed with comes from: ``dcml embed MODEL`` resolved to a checkpoint file.

MODEL is one of
- a checkpoint file written by training (``outputs/runs/<run>/checkpoints/epoch-NNNN.pt``);
- a run folder (its final checkpoint: ``train.epochs`` of its ``params.yaml``);
- a sweep's ``best.json`` (``outputs/best.json``: the best run's final checkpoint);
- an MLflow model URI: ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
  ``runs:/<run id>/model`` or ``runs:/<run id>/image-model``. The checkpoint is the
  ``checkpoint`` artifact of the run's image model (``tasks.image_model``), downloaded
  from the tracking server (``MLFLOW_TRACKING_URI``, else ``tracking.mlflow_uri`` of
  ``params.yaml``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcml.config import ConfigError, load_params
from dcml.retrieval import RetrievalError

MLFLOW_SCHEMES = ("models:/", "runs:/")
IMAGE_MODEL = "image-model"


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL: the local ``checkpoint`` and what to record about its origin."""

    checkpoint: Path
    record: dict[str, Any] = field(default_factory=dict)


def resolve_model(spec: str, params_path: str = "params.yaml") -> ModelSource:
    """Resolve MODEL (see the module docstring); :class:`RetrievalError` naming it otherwise."""
    if spec.startswith(MLFLOW_SCHEMES):
        return _from_mlflow(spec, params_path)
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return _from_best(path)
    if path.is_file():
        return ModelSource(path, {"source": spec, **_run_of_checkpoint(path)})
    if path.is_dir():
        return _from_run_folder(path, spec)
    raise RetrievalError(
        f"model not found: {spec} (a checkpoint .pt, a run folder, a sweep's best.json, or models:/..., runs:/...)"
    )


def _from_best(path: Path) -> ModelSource:
    try:
        best = json.loads(path.read_text())
        checkpoint = Path(best["checkpoint"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise RetrievalError(f"{path} is not a sweep's best.json ({error})") from None
    if not checkpoint.is_file():
        raise RetrievalError(f"{path} names the checkpoint {checkpoint}, which does not exist")
    record = {"source": str(path), "run_dir": best.get("run_dir"), "mlflow_run_id": best.get("mlflow_run_id")}
    if best.get("model_uri"):
        record["mlflow_model_uri"] = best["model_uri"]
    return ModelSource(checkpoint, record)


def _from_run_folder(folder: Path, spec: str) -> ModelSource:
    params_file = folder / "params.yaml"
    if not params_file.is_file():
        raise RetrievalError(
            f"{spec} is not a run folder (no params.yaml): give a checkpoint, a run folder or an MLflow URI"
        )
    try:
        epochs = load_params(params_file).train.epochs
    except ConfigError as error:
        raise RetrievalError(f"{params_file}: {error}") from None
    from tasks.layout import RunLayout

    checkpoint = RunLayout(folder).checkpoint(epochs)
    if not checkpoint.is_file():
        raise RetrievalError(f"run {folder} is not finished: its final checkpoint {checkpoint} does not exist")
    return ModelSource(checkpoint, {"source": spec, **_run_of_checkpoint(checkpoint)})


def _run_of_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """The run folder and MLflow run id of a checkpoint inside a run folder, when known."""
    from tasks.layout import RunLayout

    folder = checkpoint.resolve().parent.parent
    if not (folder / "params.yaml").is_file():
        return {}
    state = RunLayout(folder).tracking_state
    run_id = json.loads(state.read_text()).get("run_id") if state.is_file() else None
    return {"run_dir": str(folder), "mlflow_run_id": run_id}


def tracking_uri(params_path: str = "params.yaml") -> str | None:
    """``MLFLOW_TRACKING_URI``, else the tracking URI of ``params_path`` if it exists."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if Path(params_path).is_file():
        from tasks.tracking import connection_uri

        return connection_uri(load_params(params_path))
    return None


def _from_mlflow(uri: str, params_path: str) -> ModelSource:
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking = tracking_uri(params_path)
    if tracking:
        mlflow.set_tracking_uri(tracking)
    try:
        info = mlflow.models.get_model_info(uri)
        run_id = info.run_id
        image_uri = uri if _is_image_model(info) else f"runs:/{run_id}/{IMAGE_MODEL}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=image_uri))
    except (MlflowException, OSError) as error:
        raise RetrievalError(
            f"cannot load MLflow model {uri} (tracking URI {tracking}): {_first_line(error)}"
        ) from None
    found = sorted(local.glob("artifacts/*.pt"))
    if not found:
        raise RetrievalError(f"MLflow model {uri} has no dcml checkpoint artifact (not a dcml image model)")
    return ModelSource(found[0], {"source": uri, "mlflow_run_id": run_id, "mlflow_model_uri": image_uri})


def _is_image_model(info: Any) -> bool:
    return "python_function" in info.flavors and "pytorch" not in info.flavors


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
