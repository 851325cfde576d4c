"""A K sweep: the training flow for each K (and seed), K=1 — the plain baseline — always
included, then a comparison table and plots. Sequential by default: concurrent subflows
on Prefect's sqlite server hit "database is locked"; with ``concurrent`` the runs go to a
thread pool (use a PostgreSQL-backed Prefect server for that). Concurrent runs share
torch's global generator, so they are not bit-reproducible; sequential runs are."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags

from dcml.config import Params, load_params, to_dict, with_num_learners
from flows import remote
from flows.divide_and_conquer import divide_and_conquer, run_folder
from tasks import artifacts, locks, report, retention, tracking
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


def sweep_run_name(points: list[tuple[int, int]], now: datetime | None = None) -> str:
    """The MLflow parent run's name, e.g. ``sweep-K1,4-seeds0,1,2-2025-06-01 14:30`` (local time)."""
    ks = ",".join(str(k) for k in sorted({k for k, _ in points}))
    seeds = ",".join(str(s) for s in sorted({s for _, s in points}))
    return f"sweep-K{ks}-seeds{seeds}-{(now or datetime.now()):%Y-%m-%d %H:%M}"


def nothing_to_compute(params: Params, points: list[tuple[int, int]], out_dir: str) -> bool:
    """Whether every run of the sweep is finished on disk (final metrics and checkpoint)
    and still has its MLflow state: then the sweep reuses its previous MLflow runs."""
    for k, seed in points:
        point = with_num_learners(params, k, seed)
        layout = RunLayout(run_folder(out_dir, point))
        files = (layout.final_metrics, layout.checkpoint(point.train.epochs), layout.tracking_state)
        if not all(path.is_file() for path in files):
            return False
    return True


def sweep_key(params: Params, points: list[tuple[int, int]]) -> str:
    """What makes two sweeps the same one: the params and the points (the folder is ``--out``)."""
    settings = {key: value for key, value in to_dict(params).items() if key != "retrieval"}  # after the sweep
    text = json.dumps({"params": settings, "points": sorted(points)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextmanager
def owning(
    params: Params,
    points: list[tuple[int, int]],
    out_dir: str,
    wait: bool = False,
    logger: locks.Logger | None = None,
    runs: bool = True,
) -> Iterator[Path]:
    """Own the sweep's MLflow state file and its run folders (``tasks.locks``); yields the
    state file, ``<out>/.tracking/sweep-<key>.json``.

    One state file per sweep (:func:`sweep_key`), so two different sweeps in one folder never
    share one; a rerun of the same sweep finds the state a failed run left and continues under
    its MLflow parent; the lock keeps two live invocations of the same sweep apart. Without
    ``runs`` the run folders are left to the processes that run them (workers)."""
    key = f"sweep-{sweep_key(params, points)}"
    state = Path(out_dir) / ".tracking" / f"{key}.json"
    owned = [(locks.lock_file(out_dir, key), f"the sweep {state}")]
    for k, seed in points if runs else []:
        folder = run_folder(out_dir, with_num_learners(params, k, seed))
        owned.append((RunLayout(folder).lock, str(folder)))
    with locks.hold_all(owned, wait, logger):
        yield state


@flow(name="dcml-sweep", flow_run_name="sweep")
def sweep(
    params_path: str = "params.yaml",
    out_dir: str = "outputs",
    num_learners: list[int] | None = None,
    seeds: list[int] | None = None,
    concurrent: bool | None = None,
    prune: bool = False,
    fresh: bool = False,
    wait: bool = False,
    workers: str | None = None,
) -> dict[str, Any]:
    """Run every (K, seed) and compare them; defaults come from the ``sweep`` section.

    With ``workers`` (a deployment of the run flow, ``divide-and-conquer/dcml-run``) each
    run is a flow run of that deployment, executed concurrently by the work pool's
    workers (:mod:`flows.remote`); otherwise the runs execute in this process.

    With ``prune``, run folders under ``<out_dir>/runs`` that belong to other params are
    removed at the end (they stay in DVC's cache and MLflow), so DVC versions only the
    current sweep. With ``fresh`` every run starts over instead of continuing from its
    newest checkpoint.

    The sweep owns its MLflow state and its run folders until it ends (:func:`owning`):
    when another process holds one of them, it fails naming that process, or with
    ``wait`` waits for it; the clean-up never deletes a folder another process owns.
    """
    points = sweep_points_of(params_path, num_learners, seeds)
    # every error before any training starts (on workers the runs check their own machine)
    params = preflight(params_path, points, out_dir, local=not workers)
    if workers:
        remote.check_deployment(workers)
    with owning(params, points, out_dir, wait, get_run_logger(), runs=not workers) as parent_state:
        return _sweep(params_path, out_dir, points, params, parent_state, concurrent, prune, fresh, workers, wait)


def _sweep(
    params_path: str,
    out_dir: str,
    points: list[tuple[int, int]],
    params: Params,
    parent_state: Path,
    concurrent: bool | None,
    prune: bool,
    fresh: bool,
    workers: str | None = None,
    wait: bool = False,
) -> dict[str, Any]:
    """The sweep, owning its state (and, unless ``workers`` runs them, its run folders)."""
    # a rerun that recomputes nothing reopens the MLflow runs of the last time it finished
    finished, reuse_key = parent_state.with_name(parent_state.stem + ".finished.json"), repr(sorted(points))
    results_dir = parent_state.with_name(parent_state.stem + ".results")  # --workers: the runs' results
    reuse = str(finished) if not fresh and nothing_to_compute(params, points, out_dir) else None
    parent_id = tracking.start_run(params, sweep_run_name(points), str(parent_state), None, reuse, reuse_key)

    def one(point: tuple[int, int]) -> dict[str, Any]:
        k, seed = point
        with tags("dcml", f"K{k}", f"seed{seed}"):  # the run's flow run in the UI
            return divide_and_conquer(params_path, k, seed, out_dir, parent_id, fresh)

    try:
        if workers:
            run_parameters = {
                "params_path": str(Path(params_path).resolve()),
                "out_dir": str(Path(out_dir).resolve()),
                "parent_run_id": parent_id,
                "fresh": fresh,
                "wait": wait,
            }
            results = remote.run_on_workers(workers, points, run_parameters, results_dir)
        elif concurrent if concurrent is not None else params.sweep.concurrent:
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
        registered = tracking.register_best(params, results, parent_id)
        report.write_best(out_dir, results, params.train.epochs, registered)  # what `dcml embed` can use
        tracking.end_run(params, parent_id, "sweep")
        artifacts.sweep_table(out_dir, registered)
    except BaseException:
        tracking.mark_failed(params, parent_id, "sweep")
        raise  # the parent run's state file stays, so a rerun continues under it
    tracking.remember_finished(str(parent_state), str(finished), reuse_key)
    parent_state.unlink()
    shutil.rmtree(results_dir, ignore_errors=True)
    if prune:
        # the folders the runs report (on a worker the device may key them otherwise), by name:
        # a shared filesystem may be mounted under another path there
        keep = {(Path(out_dir) / "runs" / Path(result["run_dir"]).name).resolve() for result in results}
        if not locks.other_holders(
            out_dir, "sweep-*", except_name=parent_state.stem
        ):  # their runs are not ours to judge
            retention.remove_other_runs(Path(out_dir) / "runs", keep, get_run_logger())  # skips folders in use
        else:
            get_run_logger().warning("other run folders kept: another sweep is running in %s", out_dir)
    return {"metrics": metrics_path, "runs": run_dirs}
