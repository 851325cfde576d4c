"""What a run and a sweep show in the Prefect UI: task-run tags, a markdown artifact per
run, the sweep's comparison as a table artifact, and a summary line in the flow log.

Artifact keys follow Prefect's rule (lowercase letters, digits, dashes); a key is reused
by every rerun, so the UI lists its versions over time.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dcml.config import Params
from tasks.layout import RunLayout
from tasks.report import division_sizes

SWEEP_TABLE_KEY = "dcml-sweep-comparison"
HEADLINE = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase, only ``a-z``, ``0-9`` and ``-``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def run_tags(params: Params) -> list[str]:
    """The tags of a run's task runs (``dcml``, ``K4``, ``seed0``; tasks add their kind)."""
    return ["dcml", f"K{params.cluster.num_learners}", f"seed{params.seed}"]


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else str(value)


def run_report(
    params: Params,
    name: str,
    layout: RunLayout,
    final: dict[str, Any],
    mlflow_run_id: str,
    mlflow_link: str,
    model_id: str | None,
) -> str:
    """The run's markdown artifact (key ``dcml-k4-seed0``): final metrics, division
    sizes, the MLflow run; and the final summary line in the flow's log."""
    metrics = [key for key in final if key.startswith(("recall@", "map@", "nmi", "r_precision"))]
    lines = [
        f"# {name} — {layout.root.name}",
        "",
        f"K = {params.cluster.num_learners}, seed {params.seed}, {params.train.epochs} epochs, "
        f"dataset `{params.data.dataset}`; final epoch {final.get('epoch')} "
        f"(training {final.get('train_seconds', 0.0):.0f} s).",
        "",
        "| metric | % |",
        "|---|---|",
        *(f"| {key} | {_percent(final[key])} |" for key in metrics),
        "",
    ]
    sizes = division_sizes(layout)
    if sizes:
        lines += ["## Divisions (images per learner)", "", "| epoch | sizes |", "|---|---|"]
        lines += [f"| {epoch} | {', '.join(str(int(n)) for n in counts)} |" for epoch, counts in sizes]
        lines.append("")
    else:
        lines += ["No divisions: K = 1 trains one learner on all data.", ""]
    lines += [f"MLflow run [`{mlflow_run_id}`]({mlflow_link})" + (f", model `{model_id}`" if model_id else "")]
    lines += ["", f"Run folder: `{layout.root}`"]
    key = artifact_key("dcml", name)
    create_markdown_artifact("\n".join(lines) + "\n", key=key, description=f"{name}: final metrics")
    headline = ", ".join(f"{k} {_percent(final[k])}" for k in HEADLINE if k in final)
    get_run_logger().info("%s finished: %s (epoch %s); MLflow run %s", name, headline, final.get("epoch"), mlflow_link)
    return key


def sweep_table(out_dir: str | Path, registered: dict[str, Any] | None) -> str:
    """The sweep comparison (``<out>/comparison.csv``, one row per run) as a table artifact,
    and one log line per run plus the registered best model."""
    with open(Path(out_dir) / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    description = f"K sweep comparison ({Path(out_dir) / 'comparison.md'})"
    create_table_artifact(rows, key=SWEEP_TABLE_KEY, description=description)
    logger = get_run_logger()
    for row in rows:
        logger.info("%s", ", ".join(f"{k}={v}" for k, v in row.items()))
    if registered:
        logger.info(
            "registered model %s version %s (K=%s, seed %s, R@1 %s) has the alias 'best'",
            registered["name"],
            registered["version"],
            registered["num_learners"],
            registered["seed"],
            _percent(registered["recall@1"]),
        )
    return SWEEP_TABLE_KEY
