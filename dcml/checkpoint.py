"""Checkpoints: model, optimiser, loss (learnable beta), RNG states, epoch and config.

Written atomically; loaded with ``torch.load(weights_only=True)`` so a checkpoint can
never execute code. The config is stored as a plain nested dict next to the weights.
Checkpoints are always read onto the CPU: ``load_state_dict`` then places each tensor
where its module or optimiser wants it (Adam keeps its ``step`` counters on the CPU,
which a GPU ``map_location`` would break, costing host syncs at every step).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcml.atomic import atomic_path


class CheckpointError(ValueError):
    """A file is not a readable dcml checkpoint; the message names it.

    The subclasses say why: :class:`DamagedCheckpointError` (the file itself is positively
    damaged), :class:`CheckpointReadError` (reading it failed: permissions, I/O), and this
    class itself for a missing file or one this torch cannot load although it is intact
    (its records pass their checksums: written by another torch version, say)."""


class DamagedCheckpointError(CheckpointError):
    """The file is damaged or no dcml checkpoint at all: empty, not a torch file, cut
    short, a record that fails its CRC-32, or a torch file lacking a checkpoint's keys."""


class CheckpointReadError(CheckpointError):
    """Reading the file failed (permission denied, an I/O error): nothing is known about
    its content. The original :class:`OSError` is the ``__cause__``."""


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
    Raises :class:`CheckpointError` naming the file and saying what it is not: missing,
    empty, not a torch file, a truncated or damaged one, or a torch file that is not a
    dcml checkpoint (:class:`DamagedCheckpointError`), unreadable (:class:`CheckpointReadError`),
    or intact but not loadable by this torch (:class:`CheckpointError`).
    """
    return _load(Path(path), model_only=model_only, verified=False)


def _load(path: Path, *, model_only: bool, verified: bool) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    problem = _not_a_torch_zip(path)
    if problem:
        raise DamagedCheckpointError(f"{path} is {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=model_only)
    except OSError as error:
        raise _read_error(path, error) from error
    except MemoryError:
        raise
    except Exception as error:  # zip/pickle errors of every kind: name the file instead
        damaged = None if verified else _damaged_record(path)
        detail = f"{type(error).__name__}: {_first_line(error)}"
        if damaged is not None:
            raise DamagedCheckpointError(
                f"{path} is not a readable dcml checkpoint: a damaged torch file ({damaged}; {detail})"
            ) from None
        raise CheckpointError(  # every record passes its checksum: the file is what was written
            f"{path} is an intact torch file (its records pass their checksums) that torch {torch.__version__} "
            f"cannot load: written by another torch version, or not by dcml ({detail})"
        ) from None
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if not missing:
        if not isinstance(state["config"], dict):
            missing.append("config (a mapping of params)")
        if not isinstance(state["extra"], dict) or "num_train_classes" not in state["extra"]:
            missing.append("extra.num_train_classes")
    if missing:
        raise DamagedCheckpointError(
            f"{path} is a torch file but not a dcml checkpoint: it lacks {', '.join(missing)} "
            f"(checkpoints written by dcml training hold {', '.join(REQUIRED_KEYS)})"
        )
    if model_only:
        return {key: state[key] for key in REQUIRED_KEYS}
    return state


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint` after checking every stored record against its CRC-32.

    ``torch.load`` does not check the checksums its zip archive carries, so a checkpoint
    damaged inside its tensor data (not cut short) would load with wrong weights; this
    reads the whole file once more to catch that. For files a run depends on (resume,
    the final checkpoint); raises :class:`CheckpointError` naming the file — its subclass
    :class:`DamagedCheckpointError` only when the file is positively damaged.
    """
    path = Path(path)
    if path.is_file() and not _not_a_torch_zip(path):
        damaged = _damaged_record(path)
        if damaged is not None:
            raise DamagedCheckpointError(f"{path} is not a readable dcml checkpoint: a damaged torch file ({damaged})")
    return _load(path, model_only=False, verified=True)


def _damaged_record(path: Path) -> str | None:
    """What is damaged in the zip archive ``path`` (a record failing its CRC-32, a broken
    header), or None when every record reads back as written. I/O errors are raised as
    :class:`CheckpointReadError`: they say nothing about the content."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except OSError as error:
        raise _read_error(path, error) from error
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, struct.error...
        return f"its zip archive is damaged: {type(error).__name__}: {_first_line(error)}"
    return None if bad is None else f"record {bad} does not match its checksum"


def _read_error(path: Path, error: OSError) -> CheckpointReadError:
    return CheckpointReadError(
        f"{path} could not be read ({type(error).__name__}: {error.strerror or error}); the file may be intact"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


# The zip end-of-central-directory record, with a zip64 locator and the longest comment
# allowed, sits within this many bytes of the end of the file.
_TAIL = 22 + 20 + 56 + 65535


def _not_a_torch_zip(path: Path) -> str | None:
    """What ``path`` is instead of a torch file (``torch.save`` writes a zip archive), or None.

    Checked before ``torch.load``, whose errors for these cases are misleading (a memory-
    mapped load of a truncated file asks to re-save it "with the new zipfile serialization").
    The bytes are read here, so an I/O error is raised as :class:`CheckpointReadError`
    (``zipfile.is_zipfile`` would report it as "not a zip file").
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return "not a dcml checkpoint: the file is empty (0 bytes)"
        with path.open("rb") as file:
            head = file.read(4)
            file.seek(max(0, size - _TAIL))
            tail = file.read()
    except OSError as error:
        raise _read_error(path, error) from error
    if head != b"PK\x03\x04":
        return "not a dcml checkpoint: not a torch file (torch.save writes a zip archive, this file is none)"
    try:
        complete = zipfile.is_zipfile(io.BytesIO(tail))
    except Exception:  # noqa: BLE001 - a damaged end record can raise BadZipFile here
        complete = False
    if not complete:
        return (
            "not a readable dcml checkpoint: a truncated or damaged torch file (its zip archive has no "
            "central directory: the file was cut short)"
        )
    return None
