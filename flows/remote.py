"""A sweep's runs as flow runs of a deployment, executed by Prefect workers.

``dcml deploy --workers`` registers :func:`flows.divide_and_conquer.divide_and_conquer` as
the deployment ``divide-and-conquer/dcml-run`` on a work pool; every worker of that pool
(``prefect worker start --pool dcml-process --limit 1``, one per GPU) picks up flow runs.
``dcml sweep --workers`` then submits each (K, seed) as its own flow run of it
(``run_deployment``, linked to the sweep's flow run as a subflow), waits for all of them
and reads each run's result from the shared output folder — so workers on other machines
need that folder (a shared filesystem), the Prefect API and the MLflow server, nothing
else. How many runs execute at once is Prefect's decision: one per worker with
``--limit 1``, and at most the deployment's concurrency limit (``dcml deploy --concurrency``).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from dcml.config import ConfigError
from tasks import io

RUN_DEPLOYMENT = "divide-and-conquer/dcml-run"


def check_deployment(name: str) -> None:
    """Fail with :class:`ConfigError` (exit 2) unless a Prefect server is configured and
    knows the deployment ``name``: before the sweep starts anything."""
    if not get_current_settings().api.url:
        raise ConfigError(
            "--workers needs a Prefect server its workers poll: set PREFECT_API_URL (make up; eval "
            '"$(make -s stack-env)"), see README "Scaling out"'
        )

    async def read() -> None:
        async with get_client() as client:
            await client.read_deployment_by_name(name)

    try:
        run_coro_as_sync(read())
    except ObjectNotFound:
        url = get_current_settings().api.url
        raise ConfigError(
            f"--workers: no deployment {name!r} on {url}; create it with `dcml deploy --workers`"
        ) from None


def run_on_workers(
    deployment: str,
    points: list[tuple[int, int]],
    params_path: str,
    out_dir: str,
    parent_run_id: str,
    fresh: bool,
    results_dir: Path,
) -> list[dict[str, Any]]:
    """Submit every point as a flow run of ``deployment``, wait for all, return their
    results (as :func:`~flows.divide_and_conquer.divide_and_conquer` returns them) in
    the order of ``points``. Raises naming every run that did not complete."""
    logger = get_run_logger()
    results_dir.mkdir(parents=True, exist_ok=True)

    def one(point: tuple[int, int]) -> Any:
        k, seed = point
        parameters = {
            "params_path": str(Path(params_path).resolve()),
            "num_learners": k,
            "seed": seed,
            "out_dir": str(Path(out_dir).resolve()),
            "parent_run_id": parent_run_id,
            "fresh": fresh,
            "result_file": str(result_file(results_dir, point)),
        }
        result_file(results_dir, point).unlink(missing_ok=True)
        return run_deployment(
            deployment, parameters=parameters, tags=["dcml", f"K{k}", f"seed{seed}"], timeout=None, poll_interval=3
        )

    logger.info("submitting %d runs to the workers of %s", len(points), deployment)
    with ThreadPoolExecutor(max_workers=len(points)) as pool:  # each waits for its flow run
        flow_runs = list(pool.map(lambda point: contextvars.copy_context().run(one, point), points))
    failed = [f"{run.name} ({run.state.name if run.state else 'no state'})" for run in flow_runs if not _completed(run)]
    if failed:
        raise RuntimeError(
            f"runs on the workers did not complete: {', '.join(failed)}; rerun the sweep to continue them"
        )
    return [io.read_json(result_file(results_dir, point)) for point in points]


def result_file(results_dir: Path, point: tuple[int, int]) -> Path:
    k, seed = point
    return results_dir / f"K{k}-seed{seed}.json"


def _completed(flow_run: Any) -> bool:
    return flow_run.state is not None and flow_run.state.is_completed()
