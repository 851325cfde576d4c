"""Task helpers shared by the training tasks: the run's params, data and device."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from dcml.atomic import write_text_atomic
from dcml.config import ConfigError, DataConfig, Params, check_against_data, load_params, to_dict
from dcml.data import DatasetBundle, build_bundle, load_splits, retrieval_size
from dcml.device import resolve_device
from tasks.layout import RunLayout, params_digest
from tasks.provenance import data_version


def write_run_params(params: Params, layout: RunLayout) -> Path:
    """Freeze the run's params in its folder; a rerun must compute the same thing.

    Only ``tracking``/``sweep`` may differ from the stored file (they don't change
    results); the file is rewritten with the current values.
    """
    from dcml.atomic import write_text_atomic

    current = to_dict(params)
    if layout.params.exists():
        stored = yaml.safe_load(layout.params.read_text())
        if params_digest(stored) != params_digest(current):
            raise ConfigError(
                f"{layout.root} holds a run with different params ({layout.params}); "
                "remove that folder or choose another output folder"
            )
    text = yaml.safe_dump(current, sort_keys=False)
    ensure_writable(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(layout.params, text)


def reset_run(layout: RunLayout) -> None:
    """Start a run over (``--fresh``): delete its folder and its MLflow state file."""
    import shutil

    if layout.root.exists():
        shutil.rmtree(layout.root)
    layout.tracking_state.unlink(missing_ok=True)


def ensure_writable(folder: Path) -> None:
    """Fail unless ``folder`` exists writable or can be created; creates nothing."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output folder {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {folder} is not writable ({existing} is read-only)")


def preflight(params_path: str, points: list[tuple[int, int]], out_dir: str, local: bool = True) -> Params:
    """Every check that needs no compute, before any Prefect server starts: params (YAML,
    keys, ranges — also of each point's K and seed), device, weights file, tracking URI,
    dataset, K vs classes, output folder. Raises :class:`ConfigError` (exit status 2).
    Without ``local`` (the runs execute on workers) the device and weights file are left
    to the run flow, which checks its own machine."""
    from dcml.config import with_num_learners
    from tasks.tracking import check_tracking_uri

    params = load_params(params_path)
    per_point = [with_num_learners(params, k, seed) for k, seed in points]  # K >= 1, seed range
    if local:
        check_environment(params)
    check_tracking_uri(params.tracking.mlflow_uri)
    for point in per_point:
        validate_data(point)
    ensure_writable(Path(out_dir))
    return params


def check_environment(params: Params) -> None:
    """What the params ask of this machine: the device and a local weights file."""
    try:
        device = device_for(params)
    except RuntimeError as error:  # train.device: cuda without CUDA
        raise ConfigError(str(error)) from None
    nproc = params.train.nproc_per_node
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train.nproc_per_node is {nproc} but this machine has {torch.cuda.device_count()} CUDA device(s) "
            "(one process per GPU)"
        )
    pretrained = params.model.pretrained
    if pretrained not in ("imagenet", "none") and not Path(pretrained).expanduser().is_file():
        raise ConfigError(
            f"model.pretrained: weights file not found: {pretrained} (use 'imagenet', 'none' or a .pth file)"
        )


def run_key(params: Params) -> str:
    """The run folder's hash: result-changing params, the resolved device type and the data."""
    return params_digest(to_dict(params), device_for(params).type, data_version(params.data))


def run_params(layout: RunLayout) -> Params:
    return load_params(layout.params, resolve_preset=False)


def validate_data(params: Params) -> None:
    """Read the split records (no decoding) and check params against them."""
    splits = load_splits(params.data)
    check_against_data(params, splits.train.num_classes, retrieval_size(splits))


@lru_cache(maxsize=4)
def _bundle(data: DataConfig) -> DatasetBundle:
    return build_bundle(load_splits(data), data)


def bundle_for(params: Params) -> DatasetBundle:
    """The run's datasets, built once per process (tasks of one flow share it)."""
    return _bundle(params.data)  # frozen, hence hashable


def data_summary(params: Params) -> dict[str, float]:
    """Image/class counts of the run's datasets and how many unreadable files were skipped."""
    bundle = bundle_for(params)
    return {
        "train_images": len(bundle.splits.train),
        "train_classes": bundle.splits.train.num_classes,
        "test_images": len(bundle.splits.test),
        "test_classes": bundle.splits.test.num_classes,
        "images_skipped": bundle.num_skipped,
    }


def write_skipped_files(params: Params, layout: RunLayout) -> Path | None:
    """``<run>/skipped_files.txt``: the unreadable files data.skip_corrupt dropped (None if none)."""
    skipped = bundle_for(params).skipped
    if not skipped:
        return None
    return write_text_atomic(layout.root / "skipped_files.txt", "\n".join(skipped) + "\n")


def device_for(params: Params) -> torch.device:
    return resolve_device(params.train.device)
