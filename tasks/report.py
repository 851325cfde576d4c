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
from dcml.config import LEARNER_VARIANT_KEYS, ConfigError, Params, flatten
from dcml.metrics import knn
from tasks import io, plots, stats
from tasks.layout import NOT_RESULT_KEYS, RunLayout
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
    """Per-run table and per-variant summary over seeds (CSV + Markdown), ``metrics.json``
    for DVC (per run, ``summary``, ``vs_K1``), R@1-vs-K and R@1-vs-epoch plots."""
    out = Path(out_dir)
    finals = {label: io.read_json(RunLayout(Path(d)).final_metrics) for label, d in run_dirs.items()}
    run_settings = {label: run_params(RunLayout(Path(d))) for label, d in run_dirs.items()}
    check_comparable(run_settings)
    variants = {label: variant_label(params) for label, params in run_settings.items()}
    curves = {label: _rows(Path(d) / "history", "eval-epoch-*.json") for label, d in run_dirs.items()}
    rows = [{"run": label, "variant": variants[label], **metrics} for label, metrics in finals.items()]
    result = _rounded(stats.summarize(variant_groups(rows)))
    write_csv(out / "comparison.csv", rows)
    write_csv(out / "summary.csv", summary_rows(result))
    write_text_atomic(out / "comparison.md", markdown_table(rows) + summary_markdown(result))
    io.write_json(out / "metrics.json", {**{label: _dvc_metrics(m) for label, m in finals.items()}, **result})
    for label, evaluations in curves.items():
        write_csv(out / "plots" / "curves" / f"{label}.csv", evaluations)
    plots.recall_vs_k(rows, out / "plots" / "recall_vs_k.png")
    plots.recall_vs_epoch(curves, out / "plots" / "recall_vs_epoch.png")
    return str(out / "metrics.json")


def _dvc_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in metrics.items() if k.startswith(("recall@", "nmi", "map@", "r_prec"))}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Runs as rows, metrics in percent as columns (recall@k by k first)."""
    labels = ["run", "num_learners", "seed", "variant"]
    keys = labels + sorted(
        {k for row in rows for k in row if k.startswith(("recall@", "nmi", "map@r"))}, key=stats.metric_order
    )
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [str(row.get(k, "")) if k in labels else f"{100 * row[k]:.2f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NO_INTERVAL = "one seed: no interval available; add seeds (sweep.seeds) for error bars"


def variant_label(params: Params) -> str:
    """``K=1`` (the baseline), else ``K=<k>`` [`` masks``] [`` hierarchical``] [`` reset``]
    [`` backbone-clustered``]."""
    k = params.cluster.num_learners
    if k == 1:
        return stats.BASELINE
    return " ".join(
        [f"K={k}"]
        + (["masks"] if params.model.learners == "masks" else [])
        + (["hierarchical"] if params.cluster.hierarchical else [])
        + (
            ["reset"]
            if params.model.learners == "masks"
            and params.cluster.hierarchical
            and params.model.mask_split_state == "reset"
            else []
        )
        + (["backbone-clustered"] if params.cluster.space == "backbone" else [])
    )


VARIANT_KEYS = ("seed", "cluster.num_learners", *LEARNER_VARIANT_KEYS)


def check_comparable(run_settings: dict[str, Params]) -> None:
    """Runs are compared (and paired by seed) only if nothing but seed, K and the learner
    variant differs; otherwise ``ConfigError`` naming the first differing key."""
    settings = {}
    for label, params in run_settings.items():
        flat = {k: v for k, v in flatten(params).items() if k not in VARIANT_KEYS}
        settings[label] = {k: v for k, v in flat.items() if not k.startswith(NOT_RESULT_KEYS)}
    (first, reference), *others = settings.items()
    for label, values in others:
        differing = sorted(k for k in reference.keys() | values.keys() if reference.get(k) != values.get(k))
        if differing:
            key = differing[0]
            raise ConfigError(
                f"runs {first} and {label} differ in {key} ({reference.get(key)!r} vs {values.get(key)!r}"
                f"{f' and {len(differing) - 1} more keys' if len(differing) > 1 else ''}): only seed, K and the "
                "learner variant (masks, hierarchical) may differ between compared runs"
            )


def variant_groups(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """variant → seed → a run's final metrics, variants by K; one run per (variant, seed)."""
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: (int(r["num_learners"]), r["variant"], int(r["seed"]))):
        by_seed = groups.setdefault(row["variant"], {})
        seed = int(row["seed"])
        if seed in by_seed:
            raise ConfigError(
                f"two runs of variant {row['variant']!r} with seed {seed} ({by_seed[seed]['run']} and "
                f"{row['run']}): pairing by seed needs one run per variant and seed; pass the run folders to compare"
            )
        by_seed[seed] = row
    return groups


def finished_run_dirs(out_dir: str, run_dirs: Sequence[str] = (), runs_dir: str | None = None) -> dict[str, str]:
    """Folder name → folder: ``run_dirs``, else every finished run (with its final
    metrics file) under ``runs_dir`` (default ``<out_dir>/runs``); ``ConfigError`` when
    there is nothing to compare."""
    if run_dirs:
        folders = [Path(d) for d in run_dirs]
        for folder in folders:
            if not RunLayout(folder).final_metrics.is_file():
                raise ConfigError(f"{folder}: no final metrics ({RunLayout(folder).final_metrics}): not a finished run")
    else:
        runs = Path(runs_dir) if runs_dir is not None else Path(out_dir) / "runs"
        found = runs.iterdir() if runs.is_dir() else []
        folders = sorted(f for f in found if f.is_dir() and RunLayout(f).final_metrics.is_file())
        if not folders:
            raise ConfigError(f"no finished runs under {runs} (a finished run folder holds metrics.json)")
    names = [f.name for f in folders]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise ConfigError(f"two run folders named {duplicate}: pass each run once")
    return {folder.name: str(folder) for folder in folders}


def summary_of(metrics_path: str) -> dict[str, Any]:
    """The ``summary`` and ``vs_K1`` sections of a comparison's ``metrics.json``."""
    metrics = io.read_json(metrics_path)
    return {"summary": metrics["summary"], "vs_K1": metrics["vs_K1"]}


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: ``<metric>_mean/_std/_n``, then ``_diff_vs_K1/_diff_std/_ci_low/_ci_high/_n_paired``."""
    rows = []
    for variant, by_metric in result["summary"].items():
        row: dict[str, Any] = {"variant": variant}
        for metric, s in by_metric.items():
            row |= {f"{metric}_mean": s["mean"], f"{metric}_std": s["std"], f"{metric}_n": s["n"]}
        for metric, d in result["vs_K1"].get(variant, {}).items():
            row |= {
                f"{metric}_diff_vs_K1": d["diff"],
                f"{metric}_diff_std": d["std"],
                f"{metric}_ci_low": d["ci_low"],
                f"{metric}_ci_high": d["ci_high"],
                f"{metric}_n_paired": d["n"],
            }
        rows.append(row)
    return rows


def summary_markdown(result: dict[str, Any]) -> str:
    """Mean ± std per variant, and each variant's paired difference to K=1 (percent)."""
    summary, versus = result["summary"], result["vs_K1"]
    metrics = sorted({m for by_metric in summary.values() for m in by_metric}, key=stats.metric_order)
    lines = ["", "### mean ± std over n seeds (%)", "", _row(["variant", "n", *metrics]), _rule(2 + len(metrics))]
    for variant, by_metric in summary.items():
        n = max((s["n"] for s in by_metric.values()), default=0)
        lines.append(_row([variant, str(n), *(_mean_std(by_metric.get(m)) for m in metrics)]))
    lines += ["", f"### difference to {stats.BASELINE}, paired by seed, 95 % t-interval (percentage points)", ""]
    if not versus:
        lines.append(f"no variant to compare with {stats.BASELINE} (needs {stats.BASELINE} runs and K > 1 runs)")
        return "\n".join(lines) + "\n"
    lines += [_row(["variant", "n", *metrics]), _rule(2 + len(metrics))]
    for variant, by_metric in versus.items():
        n = max((d["n"] for d in by_metric.values()), default=0)
        lines.append(_row([variant, str(n), *(_difference(by_metric.get(m)) for m in metrics)]))
    if any(d["n"] == 1 for by_metric in versus.values() for d in by_metric.values()):
        lines += ["", NO_INTERVAL]
    if any(d["n"] == 0 for by_metric in versus.values() for d in by_metric.values()):
        lines += ["", f"no seed in common with {stats.BASELINE}: no paired difference"]
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(columns: int) -> str:
    return "|" + "---|" * columns


def _percent(value: float, sign: bool = False) -> str:
    return f"{100 * value:{'+' if sign else ''}.2f}".replace("-", "\N{MINUS SIGN}")


def _mean_std(s: dict[str, Any] | None) -> str:
    if s is None or s["mean"] is None:
        return ""
    return _percent(s["mean"]) + ("" if s["std"] is None else f" ± {_percent(s['std'])}")


def _difference(d: dict[str, Any] | None) -> str:
    if d is None or d["diff"] is None:
        return "no paired seeds"
    if d["ci_low"] is None:
        return f"{_percent(d['diff'], sign=True)} (no interval)"
    return f"{_percent(d['diff'], sign=True)} [{_percent(d['ci_low'], sign=True)}, {_percent(d['ci_high'], sign=True)}]"


def _rounded(value: Any) -> Any:
    """Floats rounded to 5 decimals, recursively (as the per-run metrics)."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 5) if isinstance(value, float) else value


def best_of(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep's best run: the K with the highest mean R@1 over seeds (ties: the smaller
    K), and of its runs the one with the highest R@1 (ties: the smaller seed). ``results``
    are the runs' flow results (``num_learners``, ``seed``, ``recall@1``, ...); runs without
    R@1 are left out; ``None`` when none has one. The one rule for ``best.json`` and the
    registered model's ``best`` alias."""
    scored = [r for r in results if r.get("recall@1") is not None]
    if not scored:
        return None
    by_k: dict[int, list[dict[str, Any]]] = {}
    for result in scored:
        by_k.setdefault(int(result["num_learners"]), []).append(result)
    best_k = max(by_k, key=lambda k: (float(np.mean([r["recall@1"] for r in by_k[k]])), -k))
    return max(by_k[best_k], key=lambda r: (r["recall@1"], -int(r["seed"])))


def write_best(out_dir: str, results: Sequence[dict[str, Any]], epochs: int, registered: dict | None) -> str | None:
    """``<out>/best.json``: the best run (:func:`best_of`), its folder and final checkpoint
    (relative to ``out_dir``'s parent when ``out_dir`` is relative), and — when the sweep
    registered it — its MLflow model URI. What ``dcml embed outputs/best.json`` embeds with."""
    best = best_of(results)
    if best is None:
        return None
    layout = RunLayout(Path(out_dir) / "runs" / Path(best["run_dir"]).name)
    record = {
        "num_learners": int(best["num_learners"]),
        "seed": int(best["seed"]),
        "recall@1": float(best["recall@1"]),
        "run_dir": str(layout.root),
        "checkpoint": str(layout.checkpoint(epochs)),
        "mlflow_run_id": best.get("mlflow_run_id"),
        "model_uri": f"models:/{registered['name']}@best" if registered else None,
    }
    return str(io.write_json(Path(out_dir) / "best.json", record))
