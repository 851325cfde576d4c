"""Task helpers shared by the training tasks: the run's params, data and device."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from dcml.config import ConfigError, Params, check_against_data, load_params, to_dict
from dcml.data import DatasetBundle, build_bundle, load_splits
from dcml.device import resolve_device
from tasks.layout import RunLayout


def write_run_params(params: Params, layout: RunLayout) -> Path:
    """Freeze the run's params in its folder; a rerun must use the same params."""
    from dcml.atomic import write_text_atomic

    text = yaml.safe_dump(to_dict(params), sort_keys=False)
    if layout.params.exists():
        if layout.params.read_text() != text:
            raise ConfigError(
                f"{layout.root} holds a run with different params ({layout.params}); "
                "remove that folder or choose another output folder"
            )
        return layout.params
    ensure_writable(layout.root)
    return write_text_atomic(layout.params, text)


def ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output folder {folder} cannot be created: {error.strerror}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {folder} is not writable")


def run_params(layout: RunLayout) -> Params:
    return load_params(layout.params, resolve_preset=False)


def validate_data(params: Params) -> dict[str, int]:
    """Read the split records (no decoding) and check params against them; returns counts."""
    splits = load_splits(params.data)
    check_against_data(params, splits.train.num_classes)
    return {
        "train_images": len(splits.train),
        "train_classes": splits.train.num_classes,
        "test_images": len(splits.test),
        "test_classes": splits.test.num_classes,
    }


@lru_cache(maxsize=4)
def _bundle(params_yaml: str) -> DatasetBundle:
    params = load_params_text(params_yaml)
    return build_bundle(load_splits(params.data), params.data)


def bundle_for(params: Params) -> DatasetBundle:
    """The run's datasets, built once per process (tasks of one flow share it)."""
    return _bundle(yaml.safe_dump(to_dict(params), sort_keys=True))


def load_params_text(text: str) -> Params:
    from dcml.config import params_from_dict

    return params_from_dict(yaml.safe_load(text))


def device_for(params: Params) -> torch.device:
    return resolve_device(params.train.device)
