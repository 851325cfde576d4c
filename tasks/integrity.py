"""Every file a rerun reads is checked before the flow decides where to continue.

Run files are written atomically and durably (``dcml.atomic``), so a crash never leaves
half a file under its final name; a file can still be damaged or lost afterwards (a full
disk during a copy, an interrupted rsync or DVC checkout, a hand edit). :func:`recover`
reads each checkpoint (with its checksums), division, embedding file, evaluation and epoch
JSON, the run's params, its code history and ``metrics.json``, and looks for every file a
resume needs. In three steps:

1. **Classify, touching nothing.** A file is *damaged* only when it positively is: a
   checkpoint that is empty, no torch file, cut short, fails a record's CRC-32 or lacks a
   checkpoint's keys (:class:`~dcml.checkpoint.DamagedCheckpointError`); Parquet, JSON or
   YAML that does not parse or lacks its columns. Any other failure — permission denied,
   an I/O error, out of memory, an intact checkpoint this torch cannot load, a Parquet
   feature this pyarrow lacks — says nothing about the file: :class:`RunFileError` names
   every such file and nothing is moved (exit status 2 from the CLI).
2. **A finished run stays finished.** When the final checkpoint and ``metrics.json`` are
   readable nothing is rewound: a damaged file is moved aside to ``<name>.corrupt-<UTC
   time>``; what a damaged or missing file held is restored where a copy exists (epoch
   statistics from ``train_history.csv``, evaluations from ``eval_history.csv``), the final
   evaluation and test embeddings are recomputed from the final checkpoint by the rerun,
   params are rewritten by it, and the rest (a division, whose checkpoint is gone) is
   reported as lost in the log and in ``<run>/recovery.json``.
3. **An unfinished run rewinds to its newest usable checkpoint.** A damaged file is moved
   aside; a missing one counts the same. The run continues from the newest readable
   checkpoint at or before the first output it lost (a division, evaluation or epoch
   statistics of an earlier epoch; when none is kept — ``train.keep_checkpoints`` keeps the
   newest only by default — from epoch 0, whose untrained model is rebuilt from the seed).
   What the run computed after that point is moved to ``<run>/superseded/<UTC time>/``
   (never deleted; the warning says how much space it holds), so the rerun recomputes it
   exactly as a resume from there would: with the same code, params and device that
   reproduces the lost results (bit-identical on the CPU).

Moved-aside files match no pattern of :class:`~tasks.layout.RunLayout`, so no task and no
retention rule sees them. :func:`verify_final_checkpoint` checks the final checkpoint
before a run counts as finished; :func:`lost_files` lists what a finished run reported
lost, which the flow then does not ask for.
"""

from __future__ import annotations

import ast
import csv
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dcml.atomic import fsync_dir, make_dirs
from dcml.checkpoint import CheckpointError, CheckpointReadError, DamagedCheckpointError, verify_checkpoint
from dcml.config import ConfigError, Params, to_dict
from dcml.schedule import Step
from tasks import io, provenance
from tasks.layout import RunLayout, params_digest

Logger = logging.Logger | logging.LoggerAdapter

SUPERSEDED = "superseded"  # <run>/superseded/<UTC time>/: what a rewind dropped
RECOVERY_LOG = "recovery.json"  # <run>/recovery.json: what recovery restored, recomputed or lost
HISTORY_CSV = {"epoch statistics": "train_history.csv", "evaluation": "eval_history.csv"}


class RunFileError(ConfigError):
    """A run file could not be checked for a reason other than damage (permission denied,
    an I/O error, out of memory, a format this software cannot read). Nothing was changed;
    the message names each file. A :class:`~dcml.config.ConfigError`: exit status 2."""


# kind -> a function that reads the file whole and raises when it cannot (looked up at call
# time: tests replace a reader to simulate an I/O error, which root's file modes cannot)
READERS: dict[str, Callable[[Path], Any]] = {}


@dataclass(frozen=True)
class RunFile:
    path: Path
    kind: str
    epoch: int | None = None


def run_files(layout: RunLayout) -> list[RunFile]:
    """Every file of the run a rerun reads, present now, with its kind and epoch."""
    files = []
    for kind, found in [
        ("checkpoint", layout.checkpoints()),
        ("division", layout.divisions()),
        ("train embeddings", layout.embedding_files("train")),
        ("test embeddings", layout.embedding_files("test")),
        ("evaluation", layout.evaluations()),
        ("epoch statistics", layout.epoch_stats_files()),
    ]:
        files += [RunFile(path, kind, epoch) for epoch, path in sorted(found.items())]
    files += [
        RunFile(layout.params, "params"),
        RunFile(layout.code_versions, "code versions"),
        RunFile(layout.final_metrics, "metrics"),
    ]
    return [file for file in files if file.path.is_file()]


def check(file: RunFile) -> str | None:
    """None when ``file`` reads whole; why it is damaged when it positively is; raises
    :class:`RunFileError` when reading it failed for another reason."""
    try:
        READERS[file.kind](file.path)
    except Exception as error:  # noqa: BLE001 - classified below, never swallowed unclassified
        if is_damage(error):
            reason = str(error) if isinstance(error, CheckpointError) else f"{type(error).__name__}: {error}"
            return _short(reason.removeprefix(f"{file.path} is "))  # the warning names the file
        raise RunFileError(_refusal(file.path, error)) from error
    return None


def is_damage(error: BaseException) -> bool:
    """Whether a reader's exception proves the file damaged (not: the reading failed)."""
    if isinstance(error, CheckpointError):
        return isinstance(error, DamagedCheckpointError)
    if isinstance(error, OSError | MemoryError | NotImplementedError):
        return False  # permissions, I/O, memory; a Parquet feature this pyarrow cannot read
    # Parquet (ArrowInvalid is a ValueError), JSON, YAML, text encoding; missing columns or keys
    return isinstance(error, ValueError | yaml.YAMLError | KeyError | IndexError | TypeError | EOFError)


def _refusal(path: Path, error: BaseException) -> str:
    if isinstance(error, CheckpointReadError) and isinstance(error.__cause__, OSError):
        error = error.__cause__
    if isinstance(error, MemoryError):
        why = "out of memory while reading it"
    elif isinstance(error, CheckpointError):
        why = str(error).removeprefix(f"{path} is ")
    elif isinstance(error, OSError):
        why = f"{type(error).__name__}: {error.strerror or error}"
    else:
        why = f"{type(error).__name__}: {error}"
    return (
        f"{path} could not be checked ({_short(why)}); that does not show the file is damaged, so nothing in "
        f"the run folder was changed: fix the cause (permissions, disk, memory, library versions) and rerun"
    )


def recover(
    layout: RunLayout, steps: Sequence[Step], keep_checkpoints: int, logger: Logger, params: Params | None = None
) -> int | None:
    """Check every file of the run; returns the epoch to continue from (None: from the
    start). See the module's docstring for what happens to damaged and missing files.
    ``params``: the command's; a stored ``params.yaml`` whose result-changing params
    differ is damaged when it is cut short, and refused otherwise (``_params_differ``)."""
    if not layout.root.is_dir():
        return None
    files = run_files(layout)
    damaged: dict[Path, tuple[RunFile, str]] = {}
    refused: list[str] = []
    for file in files:  # every file is read before anything is moved
        try:
            reason = check(file)
            if reason is None and file.kind == "params" and params is not None:
                reason = _params_differ(file.path, params)
        except RunFileError as error:
            refused.append(str(error))
            continue
        if reason is not None:
            damaged[file.path] = (file, reason)
    if refused:
        raise RunFileError(
            refused[0]
            if len(refused) == 1
            else f"{len(refused)} files of {layout.root} could not be checked: " + "; ".join(refused)
        )
    final = steps[-1].segment.end_epoch if steps else None
    before = _reached(files, final)
    usable = {epoch: path for epoch, path in layout.checkpoints().items() if path not in damaged}
    finished = final is not None and final in usable and layout.final_metrics.is_file()
    finished = finished and layout.final_metrics not in damaged
    for file, reason in damaged.values():
        _move_damaged(layout, file, reason, logger)
    if finished:
        return _keep_finished(layout, steps, final, logger, moved=bool(damaged))
    return _resume_after(layout, steps, keep_checkpoints, before, logger, moved=bool(damaged))


def verify_final_checkpoint(
    layout: RunLayout, steps: Sequence[Step], keep_checkpoints: int, epochs: int, logger: Logger
) -> None:
    """Read the final checkpoint back before the run counts as finished; a damaged one is
    moved aside, the run rewound, and :class:`CheckpointError` says that a rerun
    recomputes it (a read that fails otherwise raises :class:`RunFileError`)."""
    file = RunFile(layout.checkpoint(epochs), "checkpoint", epochs)
    reason = "checkpoint not found" if not file.path.is_file() else check(file)
    if reason is None:
        return
    if file.path.is_file():
        _move_damaged(layout, file, reason, logger)
    resume = recover(layout, steps, keep_checkpoints, logger)
    raise CheckpointError(
        f"the final checkpoint {file.path} is unreadable, so the run is not finished; rerun the same command "
        f"to recompute it from {_point(resume)}"
    )


def lost_files(layout: RunLayout) -> set[Path]:
    """Files a finished run reported lost (``recovery.json``) and still lacks: the flow
    neither recomputes nor logs them."""
    lost = {layout.root / entry["file"] for entry in _read_log(layout) if entry.get("outcome") == "lost"}
    return {path for path in lost if not path.exists()}


# --- finished runs -----------------------------------------------------------------------------


def _keep_finished(layout: RunLayout, steps: Sequence[Step], final: int, logger: Logger, moved: bool) -> int:
    """A finished run: restore, leave to the rerun, or report lost what is gone; no rewind."""
    name = layout.root.name
    events = []
    for path, kind, epoch in _history(layout, steps):
        if path.exists():
            continue
        if kind == "evaluation" and epoch == final:
            outcome = "recomputed from the final checkpoint by the rerun"
        elif _restore_from_csv(layout, kind, epoch, path):
            outcome = f"restored from {HISTORY_CSV[kind]}"
        else:
            outcome = "lost"
        events.append((path, kind, outcome))
    if not layout.embeddings("test", final).exists():
        events.append((layout.embeddings("test", final), "test embeddings", "recomputed from the final checkpoint"))
    if not layout.params.exists():
        events.append((layout.params, "params", "rewritten from the command's params"))
    if not layout.code_versions.exists():
        _restart_code_history(layout, final)
        events.append((layout.code_versions, "code versions", "lost"))
    for path, kind, outcome in events:
        rel = path.relative_to(layout.root)
        if outcome == "lost":
            detail = {
                "division": "it was computed from a checkpoint that is not kept; the results are complete without it",
                "code versions": "which code computed which epochs is unknown; a new history starts",
            }.get(kind, f"no copy in {HISTORY_CSV.get(kind, 'the run folder')}")
            logger.warning("%s: %s is lost (%s); the run stays finished", name, rel, detail)
        else:
            logger.warning("%s: %s %s; the run stays finished", name, rel, outcome)
    _log_events(layout, [(path, outcome) for path, _, outcome in events])
    if moved or events:
        logger.warning(
            "%s: finished (its final checkpoint and %s are readable): continuing from the checkpoint of epoch %d "
            "as before; nothing is recomputed but what is said above",
            name,
            layout.final_metrics.name,
            final,
        )
    return final


def _history(layout: RunLayout, steps: Sequence[Step]) -> list[tuple[Path, str, int]]:
    """(file, kind, epoch of the checkpoint it is computed from) for every output a
    resumed flow reads and does not recompute before the resume point."""
    needed = [(layout.evaluation(0), "evaluation", 0)]
    for step in steps:
        start, end = step.segment.start_epoch, step.segment.end_epoch
        if step.division == "new":
            needed.append((layout.division(start), "division", start))
        needed += [(layout.epoch_stats(epoch), "epoch statistics", start) for epoch in range(start, end)]
        if step.evaluate:
            needed.append((layout.evaluation(end), "evaluation", end))
    return needed


def _restore_from_csv(layout: RunLayout, kind: str, epoch: int, path: Path) -> bool:
    """Rewrite an epoch's JSON from the run's history CSV (``tasks.report.write_csv`` of
    the same JSON files); False when there is no readable copy."""
    if kind not in HISTORY_CSV:
        return False
    number = int(path.name.split(".")[0].rsplit("-", 1)[-1])  # the file's own epoch
    try:
        with (layout.root / HISTORY_CSV[kind]).open(newline="") as file:
            rows = [row for row in csv.DictReader(file) if row.get("epoch") == str(number)]
    except (OSError, ValueError, csv.Error):
        return False
    if len(rows) != 1:
        return False
    io.write_json(path, {key: _cell(value) for key, value in rows[0].items() if value != ""})
    return True


def _cell(text: str) -> Any:
    """A CSV cell back to the JSON value it was written from."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    if text[:1] in "[{":
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    return text


# --- unfinished runs ---------------------------------------------------------------------------


def _resume_after(
    layout: RunLayout, steps: Sequence[Step], keep: int, before: int | None, logger: Logger, moved: bool
) -> int | None:
    """The resume point of an unfinished run once damaged files are moved aside: the
    newest readable checkpoint at or before the first output that is lost; rewinds the
    run to it (``before``: the epoch the run had reached)."""
    checkpoints = layout.checkpoints()
    resume = max(checkpoints, default=None)
    lost = [
        (path, epoch)
        for path, _, epoch in _history(layout, steps)
        if resume is not None and epoch < resume and not path.exists()
    ]
    if lost:
        resume = max((epoch for epoch in checkpoints if epoch <= min(epoch for _, epoch in lost)), default=None)
    if resume and not layout.code_versions.exists():  # epochs before the resume point stay
        _restart_code_history(layout, resume)
        logger.warning(
            "%s: %s is lost: which code computed the epochs before %d is unknown; a new history starts",
            layout.root.name,
            layout.code_versions.name,
            resume,
        )
    if (resume or 0) == (before or 0):
        if moved or lost:
            logger.warning(
                "%s: continuing from %s as before; what the run still needs of the files moved aside is recomputed",
                layout.root.name,
                _point(resume),
            )
        return resume
    code_changed = _code_changed(layout)
    count, size, folder = _rewind(layout, resume or 0)
    first, last = resume or 0, (steps[-1].segment.end_epoch if steps else 0) - 1
    again = f"epoch {first} is" if first == last else f"epochs {first}-{last} are"
    reason = ", ".join(str(path.relative_to(layout.root)) for path, _ in lost[:3]) or "its newest checkpoint"
    message = (
        f"{layout.root.name}: continuing from {_point(resume)} instead of epoch {before}: {again} computed again "
        f"(training and every output; lost: {reason}{' ...' if len(lost) > 3 else ''})"
    )
    if resume is None:
        message += f" (no readable checkpoint before the lost files is kept; train.keep_checkpoints: {keep})"
    if folder is not None:
        message += (
            f"; what the run had computed after that ({count} files, {_size(size)}) was moved to "
            f"{folder.relative_to(layout.root)}/ — delete it once you no longer need it"
        )
    if code_changed:
        message += (
            f"; the code changed since those epochs were computed ({layout.code_versions.name}), so they are "
            "recomputed with the current code and can differ from the lost ones (--fresh recomputes the whole run)"
        )
    else:
        message += "; with the same code, params and device this reproduces the lost results"
    logger.warning(message)
    return resume


def _reached(files: Sequence[RunFile], final: int | None) -> int | None:
    """The epoch the run had reached: its newest checkpoint, or a later one that only what
    was computed from it still shows (a checkpoint deleted or damaged since). Epoch
    statistics don't count: a crash mid-segment leaves those of epochs it did not finish."""
    epochs = [file.epoch for file in files if file.epoch is not None and file.kind != "epoch statistics"]
    if final is not None and any(file.kind == "metrics" for file in files):
        epochs.append(final)
    return max(epochs, default=None)


def _rewind(layout: RunLayout, epoch: int) -> tuple[int, int, Path | None]:
    """Move what the run computed from checkpoints after ``epoch`` to
    ``superseded/<UTC time>/`` (checkpoints first, so a crash in between leaves a run that
    resumes from ``epoch`` at the latest). Returns (files, bytes, folder)."""
    doomed: list[Path] = []
    for found, after in [
        (layout.checkpoints(), epoch),
        (layout.divisions(), epoch),
        (layout.embedding_files("train"), epoch),
        (layout.embedding_files("test"), epoch),
        (layout.evaluations(), epoch),
        (layout.epoch_stats_files(), epoch - 1),  # epoch E's statistics come from training from E
    ]:
        doomed += [path for number, path in sorted(found.items()) if number > after]
    # a finished run's summary no longer describes the run
    summary = [layout.final_metrics, layout.root / "train_history.csv", layout.root / "eval_history.csv"]
    doomed += [path for path in summary if path.exists()]
    doomed += sorted(path for path in layout.plots.glob("*") if path.is_file()) if layout.plots.is_dir() else []
    folder = None
    size = 0
    if doomed:
        folder = _superseded_folder(layout)
        for path in doomed:
            size += path.stat().st_size
            _move(path, folder / path.relative_to(layout.root))
    if layout.code_versions.is_file():
        history = io.read_json(layout.code_versions)
        if any(entry["from_epoch"] > epoch for entry in history):
            folder = folder or _superseded_folder(layout)
            shutil.copy2(layout.code_versions, folder / layout.code_versions.name)
            size += layout.code_versions.stat().st_size
            doomed.append(layout.code_versions)
            provenance.rewind_code_versions(layout, epoch)
    if folder is not None:
        fsync_dir(folder)
    return len(doomed), size, folder


def _superseded_folder(layout: RunLayout) -> Path:
    stamp, n = _stamp(), 1
    folder = layout.root / SUPERSEDED / stamp
    while folder.exists():
        folder, n = layout.root / SUPERSEDED / f"{stamp}-{n}", n + 1
    make_dirs(folder)
    return folder


# --- moving files aside ------------------------------------------------------------------------


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.corrupt-<UTC time>`` (never over an existing file)."""
    stamp = _stamp()
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    path.rename(target)
    fsync_dir(path.parent)
    return target


def _move_damaged(layout: RunLayout, file: RunFile, reason: str, logger: Logger) -> None:
    size = file.path.stat().st_size
    target = move_aside(file.path)
    logger.warning("%s is unreadable (%s); moved aside to %s (%s)", file.path, reason, target.name, _size(size))
    _log_events(layout, [(file.path, f"damaged ({reason}); moved aside to {target.name}")])


def _move(path: Path, target: Path) -> None:
    make_dirs(target.parent)
    path.rename(target)
    fsync_dir(path.parent)
    fsync_dir(target.parent)


# --- readers and helpers -----------------------------------------------------------------------


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


def _params_differ(path: Path, params: Params) -> str | None:
    """Why the stored params are damaged — cut short: a prefix of what the command's params
    write —, None when they match the command's; other params raise :class:`RunFileError`:
    an edited file or another run's folder, which recovery must not touch."""
    text, current = path.read_text(), to_dict(params)  # read whole a moment ago
    written = yaml.safe_dump(current, sort_keys=False)  # what tasks.runs.write_run_params writes
    if text == written:
        return None
    try:
        if params_digest(_read_params(path)) == params_digest(current):
            return None  # other tracking/sweep values, or written by an older version: the same run
    except (AttributeError, TypeError, ValueError):
        pass  # a section cut off after its name (``model:`` holding nothing)
    if written.startswith(text):
        return "cut short: the beginning of the command's params, without the rest"
    raise RunFileError(
        f"{path} holds other result-changing params than the command's, whose key names this folder: edited by "
        "hand, or another run's folder; nothing was changed (move the file aside to continue the run with the "
        "command's params, or rerun with --fresh)"
    )


def _read_history(path: Path) -> list[dict[str, Any]]:
    data = io.read_json(path)
    if not isinstance(data, list) or not all(isinstance(entry, dict) and "from_epoch" in entry for entry in data):
        raise ValueError("expected a JSON list of code versions")
    return data


READERS.update(
    {
        "checkpoint": verify_checkpoint,
        "division": io.read_division,
        "train embeddings": io.read_embeddings,
        "test embeddings": io.read_embeddings,
        "evaluation": _read_mapping,
        "epoch statistics": _read_mapping,
        "params": _read_params,
        "code versions": _read_history,
        "metrics": _read_mapping,
    }
)


def _restart_code_history(layout: RunLayout, until: int) -> None:
    """A lost ``code_versions.json``: a history whose first entry says the code that
    computed the run so far is unknown (``tasks.provenance`` appends the current one)."""
    io.write_json(
        layout.code_versions,
        [
            {
                "source_digest": "unknown",
                "git_commit": "unknown",
                "from_epoch": 0,
                "since": datetime.now(UTC).isoformat(timespec="seconds"),
                "note": f"{layout.code_versions.name} was lost; the code of epochs before {until} is unknown",
            }
        ],
    )


def _code_changed(layout: RunLayout) -> bool:
    """Whether the current code differs from the last code that computed the run."""
    if not layout.code_versions.is_file():
        return False
    last = io.read_json(layout.code_versions)[-1:]
    current = provenance.code_version()
    return bool(last) and any(last[0].get(key) != value for key, value in current.items())


def _read_log(layout: RunLayout) -> list[dict[str, Any]]:
    path = layout.root / RECOVERY_LOG
    try:
        data = io.read_json(path)
    except (OSError, ValueError):
        return []
    return [entry for entry in data if isinstance(entry, dict) and "file" in entry] if isinstance(data, list) else []


def _log_events(layout: RunLayout, events: list[tuple[Path, str]]) -> None:
    """Append to ``<run>/recovery.json`` what recovery did (each file once per outcome)."""
    if not events:
        return
    entries = _read_log(layout)
    seen = {(entry["file"], entry.get("outcome")) for entry in entries}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    for path, outcome in events:
        rel = str(path.relative_to(layout.root))
        if (rel, outcome) not in seen:
            entries.append({"file": rel, "outcome": outcome, "time": now})
    io.write_json(layout.root / RECOVERY_LOG, entries)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _point(resume: int | None) -> str:
    return (
        "epoch 0 (the untrained model, rebuilt from the seed)"
        if resume is None
        else f"the checkpoint of epoch {resume}"
    )


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
