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
never needed again: resume starts from the newest one.
"""

from __future__ import annotations

from pathlib import Path

from dcml.config import Params
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
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def prune_run(layout: RunLayout, params: Params) -> list[Path]:
    """:func:`prune` with the run's ``train.keep_checkpoints`` and last epoch."""
    return prune(layout, params.train.keep_checkpoints, params.train.epochs)
