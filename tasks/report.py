"""Per-run summaries (history tables, final metrics, PNG plots) and the sweep comparison."""

from __future__ import annotations

import csv
import io as _io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from dcml.atomic import write_text_atomic
from dcml.metrics import knn
from tasks import io, plots
from tasks.layout import RunLayout
from tasks.runs import bundle_for, run_params


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def _rows(folder: Path, pattern: str) -> list[dict[str, Any]]:
    return [io.read_json(path) for path in sorted(folder.glob(pattern))]


def division_sizes(layout: RunLayout) -> list[tuple[int, np.ndarray]]:
    sizes = []
    for path in sorted((layout.root / "divisions").glob("division-epoch-*.parquet")):
        division = io.read_division(path)
        epoch = int(path.stem.rsplit("-", 1)[1])
        sizes.append((epoch, np.bincount(division.assignment, minlength=division.num_clusters)))
    return sizes


def retrieval_examples(
    embeddings: np.ndarray, labels: np.ndarray, paths: Sequence[str], num_queries: int = 8, k: int = 5
) -> tuple[list[str], list[list[str]], np.ndarray]:
    """Evenly spaced queries with their ``k`` nearest other test images."""
    queries = np.linspace(0, len(labels) - 1, num=min(num_queries, len(labels)), dtype=np.int64)
    _, neighbours = knn(embeddings, embeddings, k, exclude_self=True)
    neighbours = neighbours[queries]
    correct = labels[neighbours] == labels[queries][:, None]
    return [paths[q] for q in queries], [[paths[n] for n in row] for row in neighbours], correct


@task(name="summarize-run", task_run_name="summarize-{run_name}", cache_policy=NO_CACHE)
def summarize_run(run_dir: str, run_name: str, final_test_embeddings: str) -> dict[str, Any]:
    """history CSVs, ``metrics.json`` (last evaluation) and PNG plots of one run."""
    layout = RunLayout(Path(run_dir))
    params = run_params(layout)
    history = layout.root / "history"
    evaluations = _rows(history, "eval-epoch-*.json")
    write_csv(layout.root / "train_history.csv", _rows(history, "train-epoch-*.json"))
    write_csv(layout.root / "eval_history.csv", evaluations)
    plots.recall_curve(evaluations, layout.plots / "recall_curve.png", title=f"{run_name}: test recall@k")
    plots.cluster_sizes(division_sizes(layout), layout.plots / "cluster_sizes.png")
    embeddings, labels, indices, _ = io.read_embeddings(final_test_embeddings)
    test_paths = bundle_for(params).splits.test.paths
    queries, neighbours, correct = retrieval_examples(embeddings, labels, [test_paths[i] for i in indices])
    plots.retrieval_grid(queries, neighbours, correct, layout.plots / "retrieval_grid.png")
    final = {
        **evaluations[-1],
        "num_learners": params.cluster.num_learners,
        "seed": params.seed,
        "train_seconds": float(sum(r["seconds"] for r in _rows(history, "train-epoch-*.json"))),
    }
    io.write_json(layout.final_metrics, final)
    return final


@task(name="compare-runs", task_run_name="compare-runs", cache_policy=NO_CACHE)
def compare_runs(out_dir: str, run_dirs: dict[str, str]) -> str:
    """Sweep table (CSV + Markdown), ``metrics.json`` for DVC, R@1-vs-K and R@1-vs-epoch plots."""
    out = Path(out_dir)
    finals = {label: io.read_json(RunLayout(Path(d)).final_metrics) for label, d in run_dirs.items()}
    curves = {label: _rows(Path(d) / "history", "eval-epoch-*.json") for label, d in run_dirs.items()}
    rows = [{"run": label, **metrics} for label, metrics in finals.items()]
    write_csv(out / "comparison.csv", rows)
    write_text_atomic(out / "comparison.md", markdown_table(rows))
    io.write_json(out / "metrics.json", {label: _dvc_metrics(m) for label, m in finals.items()})
    for label, evaluations in curves.items():
        write_csv(out / "plots" / "curves" / f"{label}.csv", evaluations)
    plots.recall_vs_k(list(finals.values()), out / "plots" / "recall_vs_k.png")
    plots.recall_vs_epoch(curves, out / "plots" / "recall_vs_epoch.png")
    return str(out / "metrics.json")


def _dvc_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in metrics.items() if k.startswith(("recall@", "nmi", "map@", "r_prec"))}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Runs as rows, metrics in percent as columns (recall@k by k first)."""
    keys = ["run", "num_learners", "seed"] + sorted(
        {k for row in rows for k in row if k.startswith(("recall@", "nmi", "map@r"))},
        key=lambda k: (not k.startswith("recall@"), int(k[7:]) if k.startswith("recall@") else 0, k),
    )
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [str(row.get(k, "")) if k in keys[:3] else f"{100 * row[k]:.2f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
