"""``dcml runs``: what the run folders under ``<out>/runs`` hold, one row per folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcml.config import ConfigError
from tasks import io, locks
from tasks.layout import RunLayout
from tasks.report import variant_label
from tasks.runs import run_params


def list_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """Per run folder: K, seed, variant, epochs reached / planned, state (``finished``,
    ``running`` — another process holds its lock —, ``stopped``, ``unreadable``), the latest
    R@1 (the final one when finished) and the folder; sorted by K, seed, folder."""
    runs = Path(out_dir) / "runs"
    rows = []
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []:
        layout = RunLayout(folder)
        try:
            params = run_params(layout)
        except (ConfigError, OSError):
            rows.append({"folder": str(folder), "state": "unreadable"})
            continue
        evaluations = layout.evaluations()
        latest = io.read_json(evaluations[max(evaluations)]) if evaluations else {}
        finished = layout.final_metrics.is_file()
        final = io.read_json(layout.final_metrics) if finished else latest
        rows.append(
            {
                "K": params.cluster.num_learners,
                "seed": params.seed,
                "variant": variant_label(params),
                "epoch": layout.latest_checkpoint_epoch() or 0,
                "epochs": params.train.epochs,
                "state": "finished" if finished else _state(layout),
                "recall@1": final.get("recall@1"),
                "folder": str(folder),
            }
        )
    return sorted(rows, key=lambda r: (r.get("K", 0), r.get("seed", 0), r["folder"]))


def _state(layout: RunLayout) -> str:
    with locks.try_hold(layout.lock) as owned:
        return "stopped" if owned else "running"


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_runs`' rows."""
    if not rows:
        return "no run folders"
    header = ["K", "seed", "variant", "epoch", "state", "R@1", "folder"]
    lines = [header]
    for row in rows:
        r1 = row.get("recall@1")
        epoch = f"{row['epoch']}/{row['epochs']}" if "epochs" in row else "-"
        lines.append(
            [
                str(row.get("K", "-")),
                str(row.get("seed", "-")),
                row.get("variant", "-"),
                epoch,
                row["state"],
                f"{100 * r1:.2f}" if r1 is not None else "-",
                row["folder"],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
