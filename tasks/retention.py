"""What a run folder keeps: the one place that decides which files may be deleted.

A run keeps what resume needs and what users look at:

- checkpoints: the newest ``train.keep_checkpoints`` (default 1) and the final one;
- test embeddings: the newest evaluated epoch's only (at the end: the final ones);
- train embeddings: none once their division is written;
- divisions, evaluation and epoch JSON, history CSVs, plots: everything (small).

:func:`prune` is idempotent and safe at any moment, so the tasks call it after their
own output is written and a crash between a write and a deletion only leaves a file for
the next call. The flow consumes checkpoint *E* (test evaluation at *E*, clustering at
*E*, training from *E*) before the next checkpoint exists, so an older checkpoint is
never needed again: resume starts from the newest one. Older checkpoints are deleted only
once the newest is durable: ``dcml.atomic`` flushes every file and its folder before it
returns, and :func:`prune` flushes the newest checkpoint once more before deleting any
(a no-op for a file already on the disk; a safeguard for one copied in by other means).

:func:`remove_other_runs` is a sweep's clean-up of whole run folders of other params; it
never deletes a folder another process owns (``tasks.locks``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dcml.atomic import fsync_dir, fsync_file
from dcml.config import Params
from tasks import locks
from tasks.layout import RunLayout


def prune(layout: RunLayout, keep_checkpoints: int, final_epoch: int) -> list[Path]:
    """Delete what the rules above no longer keep; returns the deleted paths."""
    doomed: list[Path] = []
    checkpoints = layout.checkpoints()
    newest = sorted(checkpoints, reverse=True)[:keep_checkpoints]
    doomed += [path for epoch, path in checkpoints.items() if epoch not in newest and epoch != final_epoch]
    divisions = layout.divisions()
    doomed += [path for epoch, path in layout.embedding_files("train").items() if epoch in divisions]
    evaluated = layout.evaluations()
    newest_evaluated = max(evaluated, default=None)
    doomed += [
        path
        for epoch, path in layout.embedding_files("test").items()
        if epoch in evaluated and epoch != newest_evaluated and epoch != final_epoch
    ]
    if newest and any(path in checkpoints.values() for path in doomed):
        fsync_file(checkpoints[newest[0]])  # the replacement is on the disk before its predecessor goes
        fsync_dir(checkpoints[newest[0]].parent)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def prune_run(layout: RunLayout, params: Params) -> list[Path]:
    """:func:`prune` with the run's ``train.keep_checkpoints`` and last epoch."""
    return prune(layout, params.train.keep_checkpoints, params.train.epochs)


def remove_other_runs(runs_dir: Path, keep: set[Path], logger: locks.Logger) -> list[Path]:
    """A sweep's clean-up: delete the run folders under ``runs_dir`` that are not in
    ``keep`` (runs of other params), with their MLflow state — never one that another
    process owns (``tasks.locks``): that one is skipped with a warning naming the holder.
    Each folder is deleted while holding its lock, so no run starts in it meanwhile."""
    removed: list[Path] = []
    for folder in sorted(Path(runs_dir).iterdir()) if Path(runs_dir).is_dir() else []:
        layout = RunLayout(folder)
        if not folder.is_dir() or folder.resolve() in keep or not layout.params.exists():
            continue
        with locks.try_hold(layout.lock) as owned:
            if not owned:
                logger.warning("kept %s (a run of other params): in use by %s", folder, locks.describe(layout.lock))
                continue
            shutil.rmtree(folder)
            layout.tracking_state.unlink(missing_ok=True)
        removed.append(folder)
    return removed
