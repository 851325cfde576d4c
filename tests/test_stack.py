"""scripts/stack.py for real: PostgreSQL + Prefect server + MLflow server on free 127.0.0.1 ports,
Prefect's and MLflow's state checked inside PostgreSQL, an artifact proxied into the stack's
mlartifacts/, then `down` leaves no port open and no process running."""

from __future__ import annotations

import json
import os
import pwd
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_ports, query, stack

pytestmark = pytest.mark.slow


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stack_up_serves_prefect_and_mlflow_on_postgres_then_down_stops_everything(running_stack, monkeypatch):
    stack_dir, state = running_stack
    ports, services = state["ports"], state["services"]
    assert json.loads((stack_dir / "stack.json").read_text())["ports"] == ports
    assert all(stack.pid_alive(s["pid"], s["start"]) for s in services.values())
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres system user
        owner = Path(services["postgres"]["data_dir"]).stat().st_uid
        assert services["postgres"]["run_as"] == "postgres" and owner == pwd.getpwnam("postgres").pw_uid
    again = stack.up(stack_dir, pg_port=ports["pg"], prefect_port=ports["prefect"], mlflow_port=ports["mlflow"])
    assert again["already_up"] and again["services"] == services  # a second `up` starts nothing

    # Prefect: healthy, and its state lives in the `prefect` PostgreSQL database
    api = state["urls"]["prefect_api"]
    with urllib.request.urlopen(f"{api}/health", timeout=10) as response:
        assert response.status == 200
    tables = {row[0] for row in query(ports["pg"], "prefect", "select tablename from pg_tables")}
    assert {"flow", "flow_run", "deployment"} <= tables
    request = urllib.request.Request(
        f"{api}/flows/", data=json.dumps({"name": "stack-test-flow"}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (200, 201)
    assert query(ports["pg"], "prefect", "select name from flow where name = %s", "stack-test-flow")

    # MLflow: a run with an artifact through the tracking server; the run in PostgreSQL, the file in mlartifacts/
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri sets it; restored after
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    mlflow.set_tracking_uri(state["urls"]["mlflow"])
    mlflow.set_experiment("stack-test")
    with mlflow.start_run() as run:
        mlflow.log_param("k", 4)
        mlflow.log_metric("recall_at_1", 0.5)
        mlflow.log_text("hello from the stack test\n", "notes/hello.txt")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    landed = list((stack_dir / "mlartifacts").rglob("notes/hello.txt"))
    assert len(landed) == 1 and landed[0].read_text() == "hello from the stack test\n"
    assert run.info.run_id in str(landed[0])
    rows = query(ports["pg"], "mlflow", "select status from runs where run_uuid = %s", run.info.run_id)
    assert rows == [("FINISHED",)]
    assert query(ports["pg"], "mlflow", "select value from params where run_uuid = %s", run.info.run_id) == [("4",)]

    # env: the export lines the clients eval
    assert f"export PREFECT_API_URL={api}" in stack.env_lines(stack.status(stack_dir))

    # down: ports closed, processes gone (whole process groups), data directory removed, logs kept
    assert stack.down(stack_dir)
    for port in ports.values():
        assert not port_open(port), f"port {port} still open after down"
    for name, service in services.items():
        assert not stack.pid_alive(service["pid"], service["start"]), f"{name} still running"
        assert not stack.group_members(service["pid"]), f"{name}'s process group still running"
    assert not Path(services["postgres"]["root"]).exists()
    assert not (stack_dir / "stack.json").exists()
    assert {p.name for p in (stack_dir / "logs").iterdir()} == {"postgres.log", "prefect.log", "mlflow.log"}
    assert stack.status(stack_dir)["up"] is False


def test_stack_up_refuses_a_port_in_use_before_starting_anything(tmp_path: Path):
    pg_port, prefect_port, mlflow_port = free_ports(3)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", mlflow_port))
        busy.listen()
        with pytest.raises(stack.StackError, match="already in use") as refused:
            stack.up(tmp_path / "stack", pg_port=pg_port, prefect_port=prefect_port, mlflow_port=mlflow_port)
    assert refused.value.exit_code == 2
    assert not (tmp_path / "stack" / "stack.json").exists() and not (tmp_path / "stack" / "pg").exists()
