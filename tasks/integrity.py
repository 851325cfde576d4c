"""Every file a rerun reads is checked before the flow decides where to continue.

Run files are written atomically, so a crash never leaves half a file under its final
name; a file can still be damaged afterwards (a full disk during a copy, an interrupted
rsync or DVC checkout, a hand edit). :func:`recover` reads each checkpoint (with its
checksums), division, embedding file, evaluation and epoch JSON, the run's params and its
code history. An unreadable file is moved aside to ``<name>.corrupt-<UTC time>`` — kept
for inspection, matched by no pattern of :class:`~tasks.layout.RunLayout`, so no task and
no retention rule sees it — with a warning naming it, and is recomputed from the previous
good state:

- an output of epoch *E* is recomputed from a checkpoint at or before *E* (a division or
  an evaluation from the checkpoint of *E*, an epoch's statistics by training its segment
  again), so the run continues from the newest readable checkpoint that precedes every
  lost output;
- when no such checkpoint is kept (``train.keep_checkpoints`` keeps only the newest by
  default) the run starts over from epoch 0, whose untrained model is rebuilt from the seed;
- everything the run computed after that point is removed (the *rewind*), so the rerun
  recomputes it exactly as a resume from there would: with the same code, params and device
  that reproduces the lost results (bit-identical on the CPU). The warning says what is
  recomputed, and says so when the code changed since those epochs were computed.

:func:`verify_final_checkpoint` checks the final checkpoint before a run counts as finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dcml.checkpoint import CheckpointError, verify_checkpoint
from dcml.schedule import Step
from tasks import io, provenance
from tasks.layout import RunLayout

Logger = logging.Logger | logging.LoggerAdapter


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.corrupt-<UTC time>`` (never over an existing file)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    path.rename(target)
    return target


def recover(layout: RunLayout, steps: Sequence[Step], keep_checkpoints: int, logger: Logger) -> int | None:
    """Check every file of the run; move unreadable ones aside and rewind the run so that
    they are recomputed. Returns the epoch to continue from (None: from the start)."""
    if not layout.root.is_dir():
        return None
    before = layout.latest_checkpoint_epoch()
    moved = [path for path, reader in _files(layout) if not _readable(path, reader, logger)]
    return _resume_after(layout, steps, keep_checkpoints, before, logger) if moved else before


def verify_final_checkpoint(
    layout: RunLayout, steps: Sequence[Step], keep_checkpoints: int, epochs: int, logger: Logger
) -> None:
    """Read the final checkpoint back before the run counts as finished; an unreadable one
    is moved aside, the run rewound, and :class:`CheckpointError` says that a rerun recomputes it."""
    path = layout.checkpoint(epochs)
    if _readable(path, verify_checkpoint, logger):
        return
    resume = _resume_after(layout, steps, keep_checkpoints, epochs, logger)
    raise CheckpointError(
        f"the final checkpoint {path} is unreadable, so the run is not finished; rerun the same command "
        f"to recompute it from {_point(resume)}"
    )


def _files(layout: RunLayout) -> list[tuple[Path, Callable[[Path], Any]]]:
    """Every file a rerun reads, with a function that reads it whole."""
    groups: list[tuple[dict[int, Path], Callable[[Path], Any]]] = [
        (layout.checkpoints(), verify_checkpoint),
        (layout.divisions(), io.read_division),
        (layout.embedding_files("train"), io.read_embeddings),
        (layout.embedding_files("test"), io.read_embeddings),
        (layout.evaluations(), _read_mapping),
        (layout.epoch_stats_files(), _read_mapping),
    ]
    files = [(path, reader) for found, reader in groups for _, path in sorted(found.items())]
    files += [(layout.params, _read_params), (layout.code_versions, _read_history)]
    return [(path, reader) for path, reader in files if path.is_file()]


def _readable(path: Path, reader: Callable[[Path], Any], logger: Logger) -> bool:
    try:
        reader(path)
        return True
    except Exception as error:  # noqa: BLE001 - Parquet, JSON, YAML and torch fail in many ways
        reason = str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"
        reason = reason.removeprefix(f"{path} is ")  # CheckpointError names the file, the warning does
        if path.is_file():
            logger.warning("%s is unreadable (%s); moved aside to %s", path, _short(reason), move_aside(path).name)
        return False


def _resume_after(
    layout: RunLayout, steps: Sequence[Step], keep: int, before: int | None, logger: Logger
) -> int | None:
    """The resume point once unreadable files are moved aside (the run resumed from
    ``before`` until then): the newest readable checkpoint at or before the first output
    that must be recomputed; rewinds the run to it."""
    checkpoints = layout.checkpoints()
    resume = max(checkpoints, default=None)
    lost = [
        epoch for path, epoch in _needed(layout, steps) if resume is not None and epoch < resume and not path.exists()
    ]
    if lost:
        resume = max((epoch for epoch in checkpoints if epoch <= min(lost)), default=None)
    if resume == before:
        logger.warning(
            "%s: continuing from %s as before; what the run still needs of the files moved aside is recomputed",
            layout.root.name,
            _point(resume),
        )
        return resume
    code_changed = _code_changed(layout)
    _rewind(layout, resume or 0)
    first, last = resume or 0, (steps[-1].segment.end_epoch if steps else 0) - 1
    again = f"epoch {first} is" if first == last else f"epochs {first}-{last} are"
    message = (
        f"{layout.root.name}: continuing from {_point(resume)} instead of epoch {before}: {again} computed again "
        "(training and every output)"
    )
    if resume is None:
        message += f" (no readable checkpoint before the lost files is kept; train.keep_checkpoints: {keep})"
    if code_changed:
        message += (
            f"; the code changed since those epochs were computed ({layout.code_versions.name}), so they are "
            "recomputed with the current code and can differ from the lost ones (--fresh recomputes the whole run)"
        )
    else:
        message += "; with the same code, params and device this reproduces the lost results"
    logger.warning(message)
    return resume


def _needed(layout: RunLayout, steps: Sequence[Step]) -> list[tuple[Path, int]]:
    """(file, epoch of the checkpoint it is recomputed from) for each output a resumed flow
    reads but does not recompute before the resume point."""
    needed = [(layout.evaluation(0), 0)]
    for step in steps:
        start, end = step.segment.start_epoch, step.segment.end_epoch
        if step.division == "new":
            needed.append((layout.division(start), start))
        needed += [(layout.epoch_stats(epoch), start) for epoch in range(start, end)]
        if step.evaluate:
            needed.append((layout.evaluation(end), end))
    return needed


def _rewind(layout: RunLayout, epoch: int) -> None:
    """Remove what the run computed from checkpoints after ``epoch``. Checkpoints go first,
    so a crash in between leaves a run that resumes from ``epoch`` at the latest."""
    for found, after in [
        (layout.checkpoints(), epoch),
        (layout.divisions(), epoch),
        (layout.embedding_files("train"), epoch),
        (layout.embedding_files("test"), epoch),
        (layout.evaluations(), epoch),
        (layout.epoch_stats_files(), epoch - 1),  # epoch E's statistics come from training from E
    ]:
        for number, path in found.items():
            if number > after:
                path.unlink(missing_ok=True)
    layout.final_metrics.unlink(missing_ok=True)  # no longer a finished run
    provenance.rewind_code_versions(layout, epoch)


def _code_changed(layout: RunLayout) -> bool:
    """Whether the current code differs from the last code that computed the run."""
    if not layout.code_versions.is_file():
        return False
    last = io.read_json(layout.code_versions)[-1:]
    current = provenance.code_version()
    return bool(last) and any(last[0].get(key) != value for key, value in current.items())


def _read_mapping(path: Path) -> dict[str, Any]:
    data = io.read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    return data


def _read_params(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"expected a YAML mapping of params, found {type(data).__name__}")
    return data


def _read_history(path: Path) -> list[dict[str, Any]]:
    data = io.read_json(path)
    if not isinstance(data, list) or not all(isinstance(entry, dict) and "from_epoch" in entry for entry in data):
        raise ValueError("expected a JSON list of code versions")
    return data


def _point(resume: int | None) -> str:
    return (
        "epoch 0 (the untrained model, rebuilt from the seed)"
        if resume is None
        else f"the checkpoint of epoch {resume}"
    )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
