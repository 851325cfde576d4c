"""The ``dcml`` process itself: Ctrl-C prints one line and exits 130; no telemetry
outside ``make`` (issue 8, "Faults" and "Telemetry")."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from dcml.config import load_params, to_dict
from tests.conftest import REPO_ROOT, shrink

TELEMETRY = ["DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY and k not in ("CI", "PYTEST_CURRENT_TEST")}
    return {**env, **extra}


def test_keyboard_interrupt_prints_one_line(monkeypatch, capsys):
    import flows.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.cli, "_compare", interrupted)
    assert flows.cli.main(["compare"]) == 130
    assert capsys.readouterr().err == flows.cli.INTERRUPTED + "\n"


FAKE_PREFECT = """
import os, signal, time


def call(fn):
    return fn()


def busy(seconds, log, presses=1):
    for _ in range(presses):
        os.kill(os.getpid(), signal.SIGINT)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    log.append("prefect done")
"""


def module_from(code, filename):
    namespace = {}
    exec(compile(code, str(filename), "exec"), namespace)
    return namespace


@pytest.fixture()
def fake_prefect():
    return module_from(FAKE_PREFECT, "/venv/site-packages/prefect/fake_engine.py")


def test_in_prefect_looks_for_the_innermost_frame_of_ours_or_prefects(fake_prefect):
    from flows.interrupt import in_prefect

    ours = module_from("import sys\ndef here():\n    return sys._getframe()\n", REPO_ROOT / "flows" / "fake.py")
    assert in_prefect(fake_prefect["call"](sys._getframe))  # a library frame (here: sys) called by Prefect
    assert not in_prefect(fake_prefect["call"](ours["here"]))  # our code, called by Prefect
    assert not in_prefect(sys._getframe())


def test_interrupts_wait_where_python_would_only_print_them():
    from flows.interrupt import must_wait

    lock_callback = module_from("import sys\ndef cb():\n    return sys._getframe()\n", "<frozen importlib._bootstrap>")
    assert must_wait(lock_callback["cb"]())

    class Finalised:
        def __del__(self):
            frames.append(sys._getframe())

    frames = []
    Finalised()
    assert must_wait(frames[0]) and not must_wait(sys._getframe())


def test_interrupt_waits_until_prefect_returns(fake_prefect):
    from flows.interrupt import deferred_while_prefect_runs

    log = []
    with pytest.raises(KeyboardInterrupt), deferred_while_prefect_runs():
        fake_prefect["busy"](0.3, log)
        log.append("ours")
        time.sleep(5)  # the interrupt lands here
    assert log == ["prefect done", "ours"]


def test_interrupt_waits_at_most_max_defer(fake_prefect, monkeypatch):
    from flows import interrupt

    monkeypatch.setattr(interrupt, "MAX_DEFER_S", 0.2)
    log = []
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), interrupt.deferred_while_prefect_runs():
        fake_prefect["busy"](5, log)
    assert log == [] and time.monotonic() - start < 2


def test_second_ctrl_c_interrupts_at_once(fake_prefect):
    from flows.interrupt import deferred_while_prefect_runs

    log = []
    with pytest.raises(KeyboardInterrupt), deferred_while_prefect_runs():
        fake_prefect["busy"](5, log, presses=2)
    assert log == []


def test_an_error_raised_while_handling_an_interrupt_counts_as_one(monkeypatch, capsys):
    """Prefect at times turns the interrupt into its own error ("Task run is not set")."""
    import flows.cli

    def interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")  # noqa: B904 - as Prefect does

    monkeypatch.setattr(flows.cli, "_compare", interrupted)
    assert flows.cli.main(["compare"]) == 130
    assert capsys.readouterr().err == flows.cli.INTERRUPTED + "\n"


def test_ctrl_c_during_a_flow(tmp_path, tiny_demo_root):
    """A real Ctrl-C (SIGINT to the terminal's process group) once the flow runs: one
    line, exit 130, no traceback, and the temporary Prefect server is gone."""
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=50))  # outlasts the test
    path, out = tmp_path / "params.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(to_dict(params)))
    command = [sys.executable, "-m", "flows.cli", "train", "--params", str(path), "--out", str(out)]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=clean_env(PREFECT_LOGGING_LEVEL="INFO"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("runs/*/params.yaml")):  # written inside the flow
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert "dcml: interrupted; rerun the same command to continue from the newest checkpoint" in err
    assert "Traceback" not in err
    port = int(re.search(r"Starting temporary server on http://127.0.0.1:(\d+)", err).group(1))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_telemetry_off_before_prefect_or_mlflow_is_imported():
    code = """
import json, os, sys
import flows.cli
before = sorted(m for m in ("prefect", "mlflow", "dvc") if m in sys.modules)
from prefect.settings import get_current_settings
from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
print(json.dumps({
    "imported_before": before,
    "env": {k: os.environ.get(k) for k in KEYS},
    "prefect_analytics": get_current_settings().server.analytics_enabled,
    "mlflow_disabled": MLFLOW_DISABLE_TELEMETRY.get(),
}))
""".replace("KEYS", repr(TELEMETRY))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["imported_before"] == []
    assert report["env"] == {
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    assert report["prefect_analytics"] is False and report["mlflow_disabled"] is True

    # defaults only: a user can opt in
    opt_in = clean_env(DO_NOT_TRACK="false", PREFECT_SERVER_ANALYTICS_ENABLED="true")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=opt_in, capture_output=True, text=True)
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["env"]["DO_NOT_TRACK"] == "false" and report["prefect_analytics"] is True
