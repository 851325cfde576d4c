"""Checkpoints: model, optimiser, loss (learnable beta), RNG states, epoch and config.

Written atomically; loaded with ``torch.load(weights_only=True)`` so a checkpoint can
never execute code. The config is stored as a plain nested dict next to the weights.
Checkpoints are always read onto the CPU: ``load_state_dict`` then places each tensor
where its module or optimiser wants it (Adam keeps its ``step`` counters on the CPU,
which a GPU ``map_location`` would break, costing host syncs at every step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcml.atomic import atomic_path


class CheckpointError(ValueError):
    """A file is not a readable dcml checkpoint; the message names it."""


def rng_states(device: torch.device) -> dict[str, Any]:
    """Torch's CPU generator and, on CUDA, the generator of ``device`` only.

    Saving one device's state (instead of ``get_rng_state_all``) neither initialises
    every visible GPU nor ties the checkpoint to the number of GPUs it was saved with.
    """
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_states`, onto ``device``'s generator.

    Older checkpoints hold a list of every GPU's state: the first one is used. A CUDA
    state is ignored on a CPU run (CPU runs draw nothing from CUDA generators).
    """
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, list | tuple):
        cuda = cuda[0]
    torch.cuda.set_rng_state(cuda.cpu(), device)


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    loss: nn.Module | None,
    epoch: int,
    config: dict[str, Any],
    device: torch.device,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. ``epoch`` is the number of epochs completed."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "loss": loss.state_dict() if loss is not None else None,
        "epoch": epoch,
        "config": config,
        "rng": rng_states(device),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


REQUIRED_KEYS = ("model", "epoch", "config", "extra")


def load_checkpoint(path: str | Path, *, model_only: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU (``weights_only``).

    ``model_only`` memory-maps the file, so the optimiser state (two thirds of a
    ResNet-50 checkpoint) is never read; only model, config and epoch are returned.
    Raises :class:`CheckpointError` naming the file when it is missing, truncated or not
    a dcml checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=model_only)
    except Exception as error:  # zip/pickle errors of every kind: name the file instead
        raise CheckpointError(f"{path} is not a readable dcml checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a dcml checkpoint (expected keys {list(REQUIRED_KEYS)})")
    if model_only:
        return {key: state[key] for key in REQUIRED_KEYS}
    return state
