"""Register the K sweep as a scheduled deployment on a local process work pool.

prefect server start --host 127.0.0.1            # terminal 1 (UI at http://127.0.0.1:4200)
export PREFECT_API_URL=http://127.0.0.1:4200/api
dcml deploy --cron "0 2 * * *" --timezone UTC     # creates pool + deployment
prefect worker start --pool dcml-process           # terminal 2: runs scheduled sweeps

With ``--workers`` the single run flow is deployed too (``divide-and-conquer/dcml-run``, in
the pool's work queue ``runs``, :mod:`flows.remote`), and the scheduled sweep submits its runs
to it, so that the workers of that queue execute them concurrently (one per GPU:
``prefect worker start --pool dcml-process --work-queue runs --limit 1``); the sweep itself
runs on a worker of the default queue (``make worker``).
"""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.utilities.asyncutils import run_coro_as_sync

from dcml.config import ConfigError
from flows.divide_and_conquer import divide_and_conquer
from flows.remote import RUN_DEPLOYMENT, RUN_QUEUE
from flows.sweep import sweep

PROJECT_ROOT = Path(__file__).resolve().parent.parent


async def _ensure_process_pool(name: str) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_sweep(
    name: str = "k-sweep",
    pool: str = "dcml-process",
    cron: str | None = "0 2 * * *",
    params_path: str = "params.yaml",
    out_dir: str = "outputs",
    timezone: str = "UTC",
    workers: bool = False,
    concurrency: int | None = None,
) -> str:
    """Create the pool if needed and deploy :func:`flows.sweep.sweep` from this checkout.

    Paths are made absolute so the worker's process finds the params and outputs. The
    cron schedule is read in ``timezone`` (IANA name, default UTC: the same time on
    every machine, no daylight-saving jumps). With ``workers`` the run flow is deployed
    as well (:func:`deploy_runs`, at most ``concurrency`` runs at once) and the sweep
    hands its runs to it. Returns the sweep deployment's id.
    """
    check_timezone(timezone)  # before any server is contacted
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    run_coro_as_sync(_ensure_process_pool(pool))
    parameters = {"params_path": str(Path(params_path).resolve()), "out_dir": str(Path(out_dir).resolve())}
    if workers:
        deploy_runs(pool, concurrency)
        parameters["workers"] = RUN_DEPLOYMENT
    flow = sweep.from_source(source=str(PROJECT_ROOT), entrypoint="flows/sweep.py:sweep")
    return _deploy(flow, name, pool, parameters, Cron(cron, timezone=timezone) if cron else None)


def deploy_runs(pool: str, concurrency: int | None = None) -> str:
    """Deploy the single run flow as ``divide-and-conquer/dcml-run`` on ``pool`` (no
    schedule: sweeps submit to it). ``concurrency``: Prefect's limit on its flow runs
    at once, over all workers (runs beyond it wait in the queue)."""
    flow = divide_and_conquer.from_source(
        source=str(PROJECT_ROOT), entrypoint="flows/divide_and_conquer.py:divide_and_conquer"
    )
    name = RUN_DEPLOYMENT.split("/")[1]
    # a queue of its own: GPU workers (--work-queue runs --limit 1) never hold a slot with a
    # sweep that waits for runs, which would leave a GPU idle or, with one worker, hang
    return _deploy(flow, name, pool, {}, None, concurrency_limit=concurrency, work_queue_name=RUN_QUEUE)


def _deploy(flow, name: str, pool: str, parameters: dict, schedule, **options) -> str:
    deployment_id = flow.deploy(
        name=name,
        work_pool_name=pool,
        schedule=schedule,
        parameters=parameters,
        job_variables={"working_dir": str(PROJECT_ROOT)},
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
        **options,
    )
    return str(deployment_id)


def check_timezone(name: str) -> None:
    """Fail with :class:`ConfigError` (exit 2) unless ``name`` is an IANA time zone."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        message = f"--timezone: unknown time zone {name!r} (an IANA name such as UTC or Europe/Berlin)"
        raise ConfigError(message) from None
