"""A sweep's runs as flow runs of a deployment, executed by Prefect workers.

``dcml deploy --workers`` registers :func:`flows.divide_and_conquer.divide_and_conquer` as
the deployment ``divide-and-conquer/dcml-run`` on a work pool, in its work queue ``runs``;
every worker serving that queue (``prefect worker start --pool dcml-process --work-queue runs
--limit 1``, one per GPU or per group of ``train.nproc_per_node`` GPUs) picks up flow runs.
``dcml sweep --deployment`` then submits each (K, seed) as a flow run of it (linked to the
sweep's flow run as a subflow), waits for all of them and reads each run's result from the
shared output folder — so workers on other machines need that folder (a shared filesystem,
mounted at the same path), the Prefect API and the MLflow server, nothing else. How many
runs execute at once is Prefect's decision: one per worker with ``--limit 1``, and at most
the deployment's concurrency limit (``dcml deploy --concurrency``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Cancelling
from prefect.utilities.asyncutils import run_coro_as_sync

from dcml.config import ConfigError
from tasks import io

RUN_DEPLOYMENT = "divide-and-conquer/dcml-run"
RUN_QUEUE = "runs"  # the run deployment's work queue: GPU workers serve it, not the sweeps
POLL_SECONDS = 3.0


def check_deployment(name: str) -> None:
    """Fail with :class:`ConfigError` (exit 2) unless a Prefect server is configured, answers
    and knows the deployment ``name``: before the sweep starts anything."""
    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            "--deployment needs the Prefect server the workers poll: set PREFECT_API_URL (make up; eval "
            '"$(make -s stack-env)"), see docs/scaling.md'
        )

    async def read() -> None:
        async with get_client() as client:
            await client.read_deployment_by_name(name)

    try:
        run_coro_as_sync(read())
    except ObjectNotFound:
        raise ConfigError(
            f"--deployment: no deployment {name!r} on {url}; create it with `dcml deploy --workers`"
        ) from None
    except Exception as error:  # noqa: BLE001 - httpx's connection errors and the like
        raise ConfigError(f"--deployment: the Prefect API at {url} does not answer ({error})") from None


def run_on_workers(
    deployment: str,
    points: list[tuple[int, int]],
    run_parameters: dict[str, Any],
    results_dir: Path,
) -> list[dict[str, Any]]:
    """Submit every point as a flow run of ``deployment`` (the run flow's parameters:
    ``run_parameters`` plus K, seed and a result file), wait for all, return their results
    in the order of ``points``. Raises naming every run that did not complete; on an
    interruption (Ctrl-C, cancellation) the runs still pending are cancelled."""
    logger = get_run_logger()
    results_dir = results_dir.resolve()  # the workers' working directory is not ours
    results_dir.mkdir(parents=True, exist_ok=True)
    submitted = {}
    # created one by one in the flow's own thread: each is linked to the sweep as a subflow
    for k, seed in points:
        result = results_dir / f"K{k}-seed{seed}.json"
        result.unlink(missing_ok=True)
        parameters = {**run_parameters, "num_learners": k, "seed": seed, "result_file": str(result)}
        flow_run = run_deployment(
            deployment,
            parameters=parameters,
            flow_run_name=f"dcml-K{k}-seed{seed}",  # as the run flow names itself
            tags=["dcml", f"K{k}", f"seed{seed}"],
            timeout=0,
        )
        submitted[(k, seed)] = (flow_run.id, result)
        logger.info("K%d seed %d: flow run %s submitted to %s", k, seed, flow_run.name, deployment)
    try:
        states = _wait([flow_run_id for flow_run_id, _ in submitted.values()])
    except BaseException:
        _cancel_pending([flow_run_id for flow_run_id, _ in submitted.values()])
        raise
    failed = [
        f"K{k} seed {s}: {states[run_id]}" for (k, s), (run_id, _) in submitted.items() if states[run_id] != "COMPLETED"
    ]
    if failed:
        raise RuntimeError(
            f"runs on the workers did not complete ({'; '.join(failed)}); rerun the sweep to continue them"
        )
    return [io.read_json(result) for _, result in submitted.values()]


def _wait(flow_run_ids: list[UUID]) -> dict[UUID, str]:
    """Poll until every flow run is in a final state; their state types."""
    final: dict[UUID, str] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(flow_run_ids):
            time.sleep(POLL_SECONDS)
            for flow_run_id in flow_run_ids:
                if flow_run_id not in final:
                    state = client.read_flow_run(flow_run_id).state
                    if state is not None and state.is_final():
                        final[flow_run_id] = state.type.value
    return final


def _cancel_pending(flow_run_ids: list[UUID]) -> None:
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            try:
                state = client.read_flow_run(flow_run_id).state
                if state is None or not state.is_final():
                    client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
            except Exception:  # noqa: BLE001, S112 - best effort while already failing
                continue
