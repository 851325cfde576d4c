"""A K sweep spread over two real Prefect process workers on the shared stack
(scripts/stack.py: PostgreSQL + Prefect server + MLflow server): the runs overlap in time
on different workers, end with the metrics of a sequential sweep, land in one MLflow parent
run on PostgreSQL, and their outputs are pushed to the stack's DVC remote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from dcml.config import load_params, to_dict
from tasks import io
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT, query, shrink, stack

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POOL = "dcml-test-pool"
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")


def write_params(path: Path, data_root: Path, tracking_uri: str) -> Path:
    params = shrink(load_params(REPO_ROOT / "params.yaml"), data_root, tracking_uri)
    path.write_text(yaml.safe_dump(to_dict(params)))
    return path


def dcml(*args: str, env: dict, timeout: float = 1200) -> str:
    result = subprocess.run(
        [str(BIN / "dcml"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def api_post(api: str, path: str, body: dict) -> list[dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(f"{api}/{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def final_metrics(out: Path) -> dict[str, dict]:
    return {
        folder.name.split("-")[0]: io.read_json(RunLayout(folder).final_metrics) for folder in (out / "runs").iterdir()
    }


def test_a_sweep_on_two_workers_overlaps_and_matches_a_sequential_sweep(running_stack, tmp_path, tiny_demo_root):
    stack_dir, state = running_stack
    api, mlflow_url, remote = state["urls"]["prefect_api"], state["urls"]["mlflow"], state["dvc_remote"]
    # INFO: the workers log "Worker ... submitting flow run ..." into each run's log
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    project = tmp_path / "project"  # a git + DVC repository holding the shared output folder
    project.mkdir()
    params = write_params(project / "params.yaml", tiny_demo_root, mlflow_url)
    out = project / "outputs"

    dcml("deploy", "--workers", "--pool", POOL, "--params", str(params), "--out", str(out), env=env)
    logs = {name: tmp_path / f"{name}.log" for name in ("worker-a", "worker-b")}
    workers = stack.start_workers(POOL, list(logs), env, tmp_path, REPO_ROOT)
    try:
        dcml(
            "sweep", "--deployment", "--params", str(params), "--out", str(out), "-k", "1", "2", "--seeds", "0", env=env
        )
    finally:
        stack.stop_workers(workers)

    # the two runs: flow runs of the run deployment, subflows of the sweep, overlapping in time, on different workers
    flow_runs = api_post(api, "flow_runs/filter", {})
    runs = [run for run in flow_runs if run["name"].startswith("dcml-K")]
    assert sorted(run["name"] for run in runs) == ["dcml-K1-seed0", "dcml-K2-seed0"], runs
    assert all(run["state_type"] == "COMPLETED" for run in runs)
    (sweep_run,) = [run for run in flow_runs if run["name"] == "sweep"]
    for run in runs:
        with urllib.request.urlopen(f"{api}/task_runs/{run['parent_task_run_id']}", timeout=30) as response:
            assert json.loads(response.read())["flow_run_id"] == sweep_run["id"]  # shown under the sweep in the UI
    (a_start, a_end), (b_start, b_end) = [
        (datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"])) for run in runs
    ]
    assert a_start < b_end and b_start < a_end, "the runs did not overlap"
    ran_on = {}  # the worker that submitted each run, from the run's log in Prefect
    for run in runs:
        messages = [
            log["message"] for log in api_post(api, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}})
        ]
        ran_on[run["name"]] = {name for name in logs if f"Worker '{name}' submitting flow run" in " ".join(messages)}
    assert sorted(map(sorted, ran_on.values())) == [["worker-a"], ["worker-b"]], ran_on

    # the same metrics as the same sweep run sequentially in one process (sqlite, temporary server)
    sequential_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    sequential_env["PREFECT_HOME"] = str(tmp_path / "prefect-home-sequential")
    reference_params = write_params(tmp_path / "sequential.yaml", tiny_demo_root, f"sqlite:///{tmp_path / 'seq.db'}")
    reference = tmp_path / "sequential"
    dcml(
        "sweep",
        "--params",
        str(reference_params),
        "--out",
        str(reference),
        "-k",
        "1",
        "2",
        "--seeds",
        "0",
        env=sequential_env,
    )
    on_workers, in_sequence = final_metrics(out), final_metrics(reference)
    assert set(on_workers) == {"K1", "K2"}
    for k in on_workers:
        for key in METRICS:
            assert on_workers[k][key] == in_sequence[k][key], (k, key)

    # MLflow on PostgreSQL: one parent run, both runs its children
    pg = state["ports"]["pg"]
    rows = query(pg, "mlflow", "SELECT run_uuid, name FROM runs")
    parents = [run_id for run_id, name in rows if name.startswith("sweep-K1,2-seeds0")]
    assert len(parents) == 1, rows
    children = query(
        pg, "mlflow", "SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = %s", parents[0]
    )
    names = {name for run_id, name in rows if (run_id,) in children}
    assert names == {"K1-seed0", "K2-seed0"}, rows

    # the dataset and the run outputs versioned with DVC (as this repository's `sweep` stage
    # does: `dvc commit` records what the workers wrote) and pushed to the stack's remote
    shutil.copytree(tiny_demo_root, project / "data")
    stage = {"cmd": "dcml sweep --workers --params params.yaml --out outputs", "deps": ["data"]}
    stage["outs"] = [{"outputs/runs": {"persist": True}}]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sweep": stage}}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    dvc_commands = (["init", "-q"], ["remote", "add", "--local", "-d", "shared", remote], ["add", "-q", "data"])
    for command in (*dvc_commands, ["commit", "-f", "-q", "sweep"]):
        subprocess.run([str(BIN / "dvc"), *command], cwd=project, check=True, env=env)
    assert "outputs/runs" in (project / "dvc.lock").read_text()
    pushed = subprocess.run([str(BIN / "dvc"), "push"], cwd=project, env=env, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    count = int(re.search(r"(\d+) files? pushed", pushed.stdout).group(1))
    data_files = sum(1 for path in (project / "data").rglob("*") if path.is_file())
    assert count > data_files  # the dataset's files and the runs'
