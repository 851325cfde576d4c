"""A run folder is owned by one process at a time (tasks/locks.py): a second holder is
refused with the first one's name, a dead holder blocks nobody, a sweep's clean-up skips
folders in use, two sweeps keep separate MLflow state, and two real `dcml train` of the
same run do the work once."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from dcml.config import load_params, to_dict
from tasks import io, locks, retention
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT, shrink

HOLDER = """
import sys
from pathlib import Path
from tasks import locks
with locks.hold(Path(sys.argv[1]), "the test's folder"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


@contextmanager
def held_elsewhere(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the lock ``path`` while the block runs."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"  # the lock is taken and names the child
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    path = tmp_path / ".locks" / "K4-seed0-abc.lock"
    with held_elsewhere(path) as child:
        with pytest.raises(locks.BusyError) as busy, locks.hold(path, "outputs/runs/K4-seed0-abc"):
            pass
        message = str(busy.value)
        assert "outputs/runs/K4-seed0-abc is in use by" in message
        assert f"pid {child.pid} on host {socket.gethostname()}" in message and "command: -c" in message
        assert "--wait" in message
        with locks.try_hold(path) as owned:
            assert not owned
    # the holder ended: the lock is free, names this process while held, nobody after
    with locks.hold(path, "the run"):
        assert locks.read_holder(path)["pid"] == os.getpid()
        with locks.hold(path, "the run"):  # reentrant in one process (the CLI, then the flow)
            pass
        assert locks.read_holder(path)["pid"] == os.getpid()
    assert path.read_text() == ""


def test_a_dead_holder_does_not_block(tmp_path):
    path = tmp_path / "run.lock"
    with held_elsewhere(path) as child:
        child.send_signal(signal.SIGKILL)  # kill -9: no clean-up runs
        child.wait()
        assert locks.read_holder(path)["pid"] == child.pid  # its name is still in the file ...
        with locks.hold(path, "the run"):  # ... but the kernel dropped its lock
            assert locks.read_holder(path)["pid"] == os.getpid()


def test_waiting_for_a_holder_takes_the_lock_when_it_ends(tmp_path):
    path = tmp_path / "run.lock"
    messages: list[str] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())
            child.stdin.close()  # the holder ends once the waiter said it waits

    logger = logging.getLogger("test-concurrency-wait")
    logger.addHandler(Record())
    with held_elsewhere(path) as child, locks.hold(path, "the run", wait=True, logger=logger):
        assert locks.read_holder(path)["pid"] == os.getpid()
    assert len(messages) == 1 and f"in use by pid {child.pid}" in messages[0] and "waiting" in messages[0]


def fake_run(runs: Path, name: str) -> RunLayout:
    layout = RunLayout(runs / name)
    (layout.root / "checkpoints").mkdir(parents=True)
    layout.params.write_text("seed: 0\n")
    layout.tracking_state.parent.mkdir(parents=True, exist_ok=True)
    layout.tracking_state.write_text("{}")
    return layout


def test_a_sweeps_clean_up_skips_a_folder_another_process_owns(tmp_path, caplog):
    runs = tmp_path / "outputs" / "runs"
    current, busy, stale = (fake_run(runs, name) for name in ("K1-seed0-aaaa", "K4-seed0-bbbb", "K4-seed0-cccc"))
    logger = logging.getLogger("test-concurrency-prune")
    with held_elsewhere(busy.lock) as child, caplog.at_level(logging.WARNING, logger.name):
        removed = retention.remove_other_runs(runs, {current.root.resolve()}, logger)
    assert removed == [stale.root]
    assert not stale.root.exists() and not stale.tracking_state.exists()
    assert busy.params.exists() and busy.tracking_state.exists() and current.params.exists()
    (warning,) = caplog.messages
    assert str(busy.root) in warning and f"in use by pid {child.pid}" in warning


def test_a_sweep_keeps_the_folder_of_a_run_in_progress(tmp_path, tiny_params):
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import sweep

    one_epoch = dataclasses.replace(tiny_params.cluster, divide_until_epoch=1, finetune_from_epoch=1)
    params = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, epochs=1), cluster=one_epoch)
    params = dataclasses.replace(
        params, tracking=dataclasses.replace(params.tracking, mlflow_uri=f"sqlite:///{tmp_path / 'm.db'}")
    )
    params_path, out = tmp_path / "params.yaml", tmp_path / "outputs"
    params_path.write_text(yaml.safe_dump(to_dict(params)))
    in_progress, stale = fake_run(out / "runs", "K4-seed0-bbbb"), fake_run(out / "runs", "K4-seed0-cccc")
    with held_elsewhere(in_progress.lock), prefect_test_harness(server_startup_timeout=120):
        result = sweep(str(params_path), str(out), num_learners=[1], prune=True)
    assert in_progress.params.exists() and not stale.root.exists()  # a `dcml train` there keeps its folder
    assert [path.name for path in (out / "runs").iterdir()] == sorted(
        [in_progress.root.name, Path(result["runs"]["K1-seed0"]).name]
    )
    live = [path for path in (out / ".tracking").glob("sweep*.json") if not path.name.endswith(".finished.json")]
    assert not live  # the sweep's own state, removed once it finished


SWEEPS = """
import sys
from dcml.config import load_params
from flows.sweep import owning
from tasks.locks import BusyError
params, out = load_params(sys.argv[1]), sys.argv[2]
try:
    with owning(params, [(1, 0), (4, 0)], out):
        print("twin: owned")
except BusyError as error:
    print("twin:", error)
with owning(params, [(1, 1), (4, 1)], out) as state:
    print("other:", state)
"""


def test_two_sweeps_keep_their_own_state_and_a_live_sweep_excludes_its_twin(tmp_path, tiny_params):
    from flows.sweep import owning

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(to_dict(tiny_params)))
    params, out = load_params(params_path), tmp_path / "outputs"
    with owning(params, [(1, 0), (4, 0)], str(out)) as state:
        assert state.parent == out / ".tracking" and state.name.startswith("sweep-") and state.name != "sweep.json"
        command = [sys.executable, "-c", SWEEPS, str(params_path), str(out)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        child = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        twin, other = child.stdout.strip().splitlines()
        # the same sweep, while this one is live: refused, naming this process
        assert twin.startswith(f"twin: {out}") and f"is in use by pid {os.getpid()}" in twin
        # another sweep (other seeds) at the same time: its own state file, beside this one's
        other_state = Path(other.removeprefix("other: "))
        assert other_state.parent == state.parent and other_state != state
    with owning(params, [(4, 0), (1, 0)], str(out)) as again:
        assert again == state  # a rerun of the same sweep finds its state (continues under its MLflow parent)


# --- real `dcml train` processes --------------------------------------------------------


def dcml_train(params: Path, out: Path, home: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "train", "--params", str(params), "--out", str(out), *extra]
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def held_by(process: subprocess.Popen, out: Path) -> Path:
    """The run's lock file, once ``process`` holds it (synchronised on the file's content)."""
    deadline = time.monotonic() + 300
    while True:
        for path in out.glob(".locks/K*.lock"):
            if (locks.read_holder(path) or {}).get("pid") == process.pid:
                return path
        assert process.poll() is None and time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.05)


@pytest.mark.slow  # 1-2 min: in make test-slow (CI runs both)
def test_two_identical_dcml_train_do_the_work_once(tmp_path, tiny_demo_root):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, uri)
    params = dataclasses.replace(
        params,
        train=dataclasses.replace(params.train, epochs=2),
        tracking=dataclasses.replace(params.tracking, log_model=True),
    )
    params_path, out = tmp_path / "params.yaml", tmp_path / "out"
    params_path.write_text(yaml.safe_dump(to_dict(params)))

    first = dcml_train(params_path, out, tmp_path / "home-1")
    try:
        lock = held_by(first, out)
        first.send_signal(signal.SIGSTOP)  # it keeps its lock and cannot finish meanwhile

        second = dcml_train(params_path, out, tmp_path / "home-2")
        output = second.communicate(timeout=300)[0]
        assert second.returncode == 2, output[-3000:]
        assert "is in use by" in output and f"pid {first.pid}" in output and "--wait" in output

        waiting = dcml_train(params_path, out, tmp_path / "home-3", "--wait")
        seen = ""
        while "waiting until it ends" not in seen:
            line = waiting.stdout.readline()
            assert line, f"--wait ended without waiting: {seen[-3000:]}"
            seen += line
        assert f"pid {first.pid}" in seen
        first.send_signal(signal.SIGCONT)
        output_first = first.communicate(timeout=600)[0]
        assert first.returncode == 0, output_first[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    layout = RunLayout(out / "runs" / lock.name.removesuffix(".lock"))
    finished = {path: path.stat().st_mtime_ns for path in [layout.checkpoint(2), *layout.root.glob("history/*.json")]}

    output = seen + waiting.communicate(timeout=600)[0]
    assert waiting.returncode == 0, output[-3000:]
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # reused, not recomputed
    epochs = sorted(io.read_json(p)["epoch"] for p in (layout.root / "history").glob("train-epoch-*.json"))
    assert epochs == [0, 1]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.tracking.experiment or f"dcml-{params.data.dataset}")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_name for run in runs] == ["K4-seed0"]  # the waiting one reopened the run
    logged = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.name for m in logged) == ["image-model", "model"]  # each once: tensors in, images in
    assert lock.read_text() == ""  # nobody holds the run now
