"""A K sweep: the training flow for each K (and seed), K=1 — the plain baseline — always
included, then a comparison table and plots. Sequential by default: concurrent subflows
on Prefect's sqlite server hit "database is locked"; with ``concurrent`` the runs go to a
thread pool (use a PostgreSQL-backed Prefect server for that). Concurrent runs share
torch's global generator, so they are not bit-reproducible; sequential runs are."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow

from dcml.config import load_params, with_num_learners
from flows.divide_and_conquer import divide_and_conquer, run_folder
from tasks import report, tracking
from tasks.layout import RunLayout, run_name
from tasks.runs import preflight


def sweep_points(num_learners: list[int], seeds: list[int]) -> list[tuple[int, int]]:
    """(K, seed) pairs, K=1 added when missing, sorted by K then seed."""
    return [(k, s) for k in sorted({1, *num_learners}) for s in sorted(set(seeds))]


def sweep_points_of(params_path: str, num_learners: list[int] | None, seeds: list[int] | None) -> list[tuple[int, int]]:
    """The sweep's points: the arguments, else the ``sweep`` section of the params."""
    params = load_params(params_path)
    ks = params.sweep.num_learners if num_learners is None else num_learners
    return sweep_points(list(ks), list(params.sweep.seeds if seeds is None else seeds))


@flow(name="dcml-sweep", flow_run_name="sweep")
def sweep(
    params_path: str = "params.yaml",
    out_dir: str = "outputs",
    num_learners: list[int] | None = None,
    seeds: list[int] | None = None,
    concurrent: bool | None = None,
    prune: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run every (K, seed) and compare them; defaults come from the ``sweep`` section.

    With ``prune``, run folders under ``<out_dir>/runs`` that belong to other params are
    removed at the end (they stay in DVC's cache and MLflow), so DVC versions only the
    current sweep. With ``fresh`` every run starts over instead of continuing from its
    newest checkpoint.
    """
    points = sweep_points_of(params_path, num_learners, seeds)
    params = preflight(params_path, points, out_dir)  # every error before any training starts
    parent_state = Path(out_dir) / ".tracking" / "sweep.json"
    parent_id = tracking.start_run(params, "sweep", str(parent_state))

    def one(point: tuple[int, int]) -> dict[str, Any]:
        k, seed = point
        return divide_and_conquer(params_path, k, seed, out_dir, parent_id, fresh)

    try:
        if concurrent if concurrent is not None else params.sweep.concurrent:
            with ThreadPoolExecutor(max_workers=len(points)) as pool:
                results = list(pool.map(one, points))
        else:
            results = [one(point) for point in points]
        run_dirs = {run_name(k, s): r["run_dir"] for (k, s), r in zip(points, results, strict=True)}
        metrics_path = report.compare_runs(out_dir, run_dirs)
        tracking.log_summary(params, parent_id, report.summary_of(metrics_path), str(parent_state))
        tracking.log_artifacts(
            params,
            parent_id,
            {
                "comparison": str(Path(out_dir) / "comparison.md"),
                "summary": str(Path(out_dir) / "summary.csv"),
                "plots": str(Path(out_dir) / "plots"),
            },
            str(parent_state),
        )
        tracking.end_run(params, parent_id, "sweep")
    except BaseException:
        tracking.mark_failed(params, parent_id, "sweep")
        raise  # the parent run's state file stays, so a rerun continues under it
    parent_state.unlink()
    if prune:
        keep = {run_folder(out_dir, with_num_learners(params, k, s)).resolve() for k, s in points}
        for folder in (Path(out_dir) / "runs").iterdir():
            if folder.is_dir() and folder.resolve() not in keep and RunLayout(folder).params.exists():
                shutil.rmtree(folder)
                RunLayout(folder).tracking_state.unlink(missing_ok=True)
    return {"metrics": metrics_path, "runs": run_dirs}
