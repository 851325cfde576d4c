"""A real `prefect server` on a free port, the sweep deployed with a cron schedule on a
process work pool, a real process worker, one triggered run waited for to completion."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from dcml.config import load_params, to_dict
from tests.conftest import REPO_ROOT, shrink

pytestmark = pytest.mark.slow

TRIGGER_AND_WAIT = """
import time

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.utilities.asyncutils import run_coro_as_sync

run = run_deployment("dcml-sweep/k-sweep", timeout=0)  # create the flow run, wait below


async def state_of(run_id):
    async with get_client() as client:
        return (await client.read_flow_run(run_id)).state


# poll ourselves: a transient API error on a busy 2-core machine must not end the wait
deadline, state = time.monotonic() + 900, None
while time.monotonic() < deadline:
    try:
        state = run_coro_as_sync(state_of(run.id))
    except Exception as error:  # noqa: BLE001 - retried until the deadline
        print("poll failed, retrying:", repr(error), flush=True)
    if state is not None and state.is_final():
        break
    time.sleep(3)
print(state.type.value if state else "NO_STATE")


async def crons():
    async with get_client() as client:
        deployment = await client.read_deployment_by_name("dcml-sweep/k-sweep")
        return [s.schedule.cron for s in deployment.schedules]


print(run_coro_as_sync(crons()))
"""
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "prefect server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout}s")


@pytest.fixture()
def prefect_server(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, server)
        yield {**env, "PREFECT_API_URL": url}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_scheduled_sweep_deployment_runs_on_a_process_worker(prefect_server, tiny_demo_root, tmp_path):
    env = prefect_server
    params = shrink(
        load_params(REPO_ROOT / "params.yaml"),
        tiny_demo_root,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(to_dict(params)))
    out = tmp_path / "outputs"
    subprocess.run(
        [
            str(BIN / "dcml"),
            "deploy",
            "--params",
            str(params_path),
            "--out",
            str(out),
            "--pool",
            "test-pool",
            "--cron",
            "0 3 * * *",
        ],
        env=env,
        check=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "test-pool", "--type", "process"],
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        code = TRIGGER_AND_WAIT
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=960, cwd=tmp_path
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a flow run still going: the assertions below say why
            worker.kill()
            worker.wait()
        worker_log.close()
    assert result.returncode == 0, result.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    state, crons = result.stdout.strip().splitlines()[-2:]
    assert state == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
    assert crons == "['0 3 * * *']"
    metrics = yaml.safe_load((out / "metrics.json").read_text())
    assert set(metrics) == {"K1-seed0", "K4-seed0", "summary", "vs_K1"}
