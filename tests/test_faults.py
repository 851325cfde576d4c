"""Broken files and killed processes (issue 8, "Faults"): every file a rerun reads is
checked, an unreadable one is moved aside and recomputed from the previous good state, the
final checkpoint is verified, ``dcml evaluate`` says what a file is not, and Prefect's
temporary server does not outlive a ``dcml`` process killed with SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dcml.checkpoint import CheckpointError, verify_checkpoint
from dcml.config import load_params, to_dict
from dcml.division import all_data
from dcml.schedule import steps_from_params
from dcml.trainer import Trainer
from flows.cli import main
from tasks import integrity, io, provenance
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT, shrink

CPU = torch.device("cpu")
LOGGER = "tests.faults"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


# --- dcml evaluate on files that are not checkpoints ------------------------------------------


def test_evaluate_says_what_the_file_is_not(tmp_path, tiny_params, capsys):
    good = Trainer.create(tiny_params, 10, CPU, load_pretrained=False).save(tmp_path / "good.pt")
    files = {
        "random.pt": (os.urandom(3000), "not a torch file"),
        "empty.pt": (b"", "the file is empty (0 bytes)"),
        "truncated.pt": (good.read_bytes()[:50_000], "truncated"),
    }
    for name, (content, _) in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    state = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "config"}, tmp_path / "no-config.pt")
    torch.save({**state, "config": {"no_such_section": 1}}, tmp_path / "bad-config.pt")
    expected = {name: message for name, (_, message) in files.items()} | {
        "other.pt": "a torch file but not a dcml checkpoint: it lacks model, epoch, config, extra",
        "no-config.pt": "a torch file but not a dcml checkpoint: it lacks config",
        "bad-config.pt": "its stored config is not valid dcml params",
        "missing.pt": "checkpoint not found",
    }
    for name, message in expected.items():
        path = tmp_path / name
        assert main(["evaluate", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("dcml: error: ") and message in err and str(path) in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_verify_checkpoint_catches_damage_inside_the_data(tmp_path, tiny_params):
    """``torch.load`` does not check the zip's checksums: damaged weights would load."""
    path = Trainer.create(tiny_params, 10, CPU, load_pretrained=False).save(tmp_path / "epoch-0001.pt")
    verify_checkpoint(path)
    flip_middle(path)
    with pytest.raises(CheckpointError, match="does not match its checksum") as error:
        verify_checkpoint(path)
    assert str(path) in str(error.value)


# --- recover(): what a rerun does with unreadable files (no training) -------------------------


@pytest.fixture()
def finished_run(tmp_path, tiny_params):
    """The files of a finished 3-epoch K=4 run of ``shrink``'s schedule (divisions at epochs
    0 and 1, fine-tuning from 2, evaluation after every epoch), made without training;
    ``keep`` checkpoints kept (default 1: the final one)."""
    steps = steps_from_params(tiny_params)
    assert [(s.segment.start_epoch, s.segment.end_epoch, s.division) for s in steps] == [
        (0, 1, "new"),
        (1, 2, "new"),
        (2, 3, "all"),
    ]
    trainer = Trainer.create(tiny_params, 10, CPU, load_pretrained=False)

    def make(keep: int = 1) -> RunLayout:
        layout = RunLayout(tmp_path / "runs" / "K4-seed0-test")
        layout.params.parent.mkdir(parents=True)
        layout.params.write_text(yaml.safe_dump(to_dict(tiny_params)))
        for epoch in range(4 - keep, 4):
            trainer.save(layout.checkpoint(epoch))
        labels = np.arange(12) % 3
        for epoch in (0, 1):
            io.write_division(layout.division(epoch), all_data(12), labels, epoch=epoch, division_index=epoch)
        for epoch in range(4):
            io.write_json(layout.evaluation(epoch), {"epoch": epoch, "recall@1": 0.5})
        for epoch in range(3):
            io.write_json(layout.epoch_stats(epoch), {"epoch": epoch, "loss": 0.1})
        embeddings = np.zeros((12, 4), np.float32)
        io.write_embeddings(layout.embeddings("test", 3), embeddings, labels, np.arange(12), split="test", epoch=3)
        io.write_json(layout.final_metrics, {"epoch": 3})
        provenance.record_code_version(layout, 0)
        return layout

    return make, steps


def recover(layout: RunLayout, steps, keep: int, caplog) -> tuple[int | None, str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        resume = integrity.recover(layout, steps, keep, logging.getLogger(LOGGER))
    return resume, caplog.text


def test_nothing_broken_nothing_moved(finished_run, caplog):
    make, steps = finished_run
    layout = make()
    files = sorted(layout.root.rglob("*"))
    assert recover(layout, steps, 1, caplog) == (3, "")
    assert sorted(layout.root.rglob("*")) == files


def test_the_only_checkpoint_truncated_restarts_from_epoch_0(finished_run, caplog):
    make, steps = finished_run
    layout = make(keep=1)
    final = layout.checkpoint(3)
    truncate(final)
    resume, log = recover(layout, steps, 1, caplog)
    assert resume is None  # the flow rebuilds the untrained model (epoch 0) from the seed
    assert not final.exists() and len(aside(final)) == 1
    assert f"{final} is unreadable (not a readable dcml checkpoint: a truncated" in log
    assert aside(final)[0].name in log
    assert "continuing from epoch 0 (the untrained model, rebuilt from the seed) instead of epoch 3" in log
    assert "train.keep_checkpoints: 1" in log and "reproduces the lost results" in log
    # rewound: what epochs 0-2 computed is gone, so the rerun recomputes it; epoch 0's outputs stay
    assert sorted(layout.divisions()) == [0] and sorted(layout.evaluations()) == [0]
    assert layout.epoch_stats_files() == {} and layout.embedding_files("test") == {}
    assert not layout.final_metrics.exists()
    assert layout.latest_checkpoint_epoch() is None


def test_an_older_kept_checkpoint_is_the_previous_good_state(finished_run, caplog):
    make, steps = finished_run
    layout = make(keep=2)
    flip_middle(layout.checkpoint(3))  # loads with torch, fails its checksum
    resume, log = recover(layout, steps, 2, caplog)
    assert resume == 2 and "continuing from the checkpoint of epoch 2 instead of epoch 3" in log
    assert "does not match its checksum" in log
    assert sorted(layout.checkpoints()) == [2] and sorted(layout.divisions()) == [0, 1]
    assert sorted(layout.evaluations()) == [0, 1, 2] and sorted(layout.epoch_stats_files()) == [0, 1]


def test_a_lost_division_goes_back_to_a_checkpoint_before_it(finished_run, caplog):
    """Division 1 is computed from the checkpoint of epoch 1, long gone. A finished run stays
    finished (the division is reported lost); an unfinished one restarts from the newest
    checkpoint at or before epoch 1 (none kept: epoch 0), keeping what it drops in superseded/."""
    make, steps = finished_run
    layout = make(keep=2)
    division = layout.division(1)
    division.write_bytes(b"garbage")
    resume, log = recover(layout, steps, 2, caplog)
    assert resume == 3 and f"{division} is unreadable (ArrowInvalid" in log
    assert "divisions/division-epoch-0001.parquet is lost" in log and "the run stays finished" in log
    assert sorted(layout.checkpoints()) == [2, 3] and layout.final_metrics.exists()
    assert integrity.lost_files(layout) == {division}

    layout.final_metrics.unlink()  # not finished: the run must recompute division 1
    resume, log = recover(layout, steps, 2, caplog)
    assert resume is None and layout.checkpoints() == {} and sorted(layout.divisions()) == [0]
    (superseded,) = (layout.root / "superseded").iterdir()
    assert sorted(p.name for p in (superseded / "checkpoints").iterdir()) == ["epoch-0002.pt", "epoch-0003.pt"]
    assert f"was moved to superseded/{superseded.name}/" in log


def test_a_lost_final_evaluation_is_recomputed_from_the_final_checkpoint(finished_run, caplog):
    make, steps = finished_run
    layout = make()
    evaluation = layout.evaluation(3)
    evaluation.write_text('{"epoch": 3, "recall@')
    resume, log = recover(layout, steps, 1, caplog)
    assert resume == 3 and "JSONDecodeError" in log and "continuing from the checkpoint of epoch 3 as before" in log
    assert not evaluation.exists() and len(aside(evaluation)) == 1
    assert sorted(layout.evaluations()) == [0, 1, 2] and layout.final_metrics.exists()  # nothing else touched


def test_a_code_change_since_the_lost_epochs_is_said(finished_run, caplog):
    make, steps = finished_run
    layout = make()
    history = io.read_json(layout.code_versions)
    io.write_json(layout.code_versions, [{**history[0], "source_digest": "0123456789abcdef"}])
    truncate(layout.checkpoint(3))
    _, log = recover(layout, steps, 1, caplog)
    assert "the code changed since those epochs were computed" in log and "can differ" in log


def test_unreadable_params_and_code_history_are_moved_aside(finished_run, caplog):
    make, steps = finished_run
    layout = make()
    layout.params.write_text("seed: [unclosed\n")
    layout.code_versions.write_text("[{")
    resume, log = recover(layout, steps, 1, caplog)
    assert resume == 3 and aside(layout.params) and aside(layout.code_versions)
    assert "params.yaml is unreadable" in log and "code_versions.json is unreadable" in log


def test_the_final_checkpoint_is_verified_before_the_run_counts_as_finished(finished_run, caplog):
    make, steps = finished_run
    layout = make(keep=2)
    truncate(layout.checkpoint(3))
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(CheckpointError) as error:
        integrity.verify_final_checkpoint(layout, steps, 2, 3, logging.getLogger(LOGGER))
    assert "the run is not finished; rerun the same command to recompute it from the checkpoint of epoch 2" in str(
        error.value
    )
    assert aside(layout.checkpoint(3)) and sorted(layout.checkpoints()) == [2]


# --- a real rerun after damage: moved aside, recomputed, same results --------------------------


def dcml(*args: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.fixture()
def params_path(tmp_path, tiny_demo_root) -> Path:
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(params)))
    return path


@pytest.mark.slow  # 1-2 min: in make test-slow (CI runs both)
def test_a_rerun_recomputes_unreadable_files_and_verifies_the_final_checkpoint(tmp_path, params_path):
    out = tmp_path / "out"
    train = ("train", "--params", str(params_path), "--out", str(out))
    finish(dcml(*train, home=tmp_path / "home-1"))
    (folder,) = (out / "runs").iterdir()
    layout = RunLayout(folder)
    expected = io.read_json(layout.final_metrics)
    final, division, evaluation = layout.checkpoint(3), layout.division(1), layout.evaluation(2)
    truncate(final)  # the only checkpoint kept: the run goes back to epoch 0
    division.write_bytes(division.read_bytes()[:100])
    evaluation.write_text("{")

    output = finish(dcml(*train, home=tmp_path / "home-2"))
    for path in (final, division, evaluation):
        assert f"{path} is unreadable" in output and len(aside(path)) == 1, output[-3000:]
    assert "continuing from epoch 0 (the untrained model, rebuilt from the seed) instead of epoch 3" in output
    verify_checkpoint(final)
    metrics = io.read_json(layout.final_metrics)
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r"):
        assert metrics[key] == expected[key], key  # bit-identical to the run before the damage
    assert io.read_division(division).num_clusters == 4 and io.read_json(evaluation)["epoch"] == 2


# --- Prefect's temporary server dies with the dcml process ------------------------------------


def children(pid: int) -> dict[int, str]:
    """Child pid -> command line (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie holds no memory nor port; this container's init
    does not reap orphans)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_watchdog_stops_a_process_when_its_starter_dies():
    code = (
        "import subprocess, sys, time; from flows.server_guard import start_watchdog;"
        "server = subprocess.Popen(['sleep', '300']); start_watchdog(server.pid); time.sleep(300)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
    kids: dict[int, str] = {}
    try:
        wait_until(lambda: len(children(parent.pid)) == 2, 30, "no server and watchdog")
        kids = children(parent.pid)
        (server,) = [pid for pid, cmd in kids.items() if cmd.startswith("sleep")]
        (watchdog,) = [pid for pid, cmd in kids.items() if "server_guard.py" in cmd]
        parent.kill()
        parent.wait()
        wait_until(lambda: not running(server), 10, "the server outlived its starter")
        wait_until(lambda: not running(watchdog), 10, "the watchdog did not exit")
    finally:
        parent.kill()
        for pid in kids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_kill_9_of_dcml_leaves_no_prefect_server(tmp_path, params_path):
    params = load_params(params_path)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=50))  # outlasts the test
    params_path.write_text(yaml.safe_dump(to_dict(params)))
    out = tmp_path / "out"
    process = dcml("train", "--params", str(params_path), "--out", str(out), home=tmp_path / "home")
    server = None
    try:

        def started() -> bool:  # the flow runs (it writes the run's params), so its server does
            assert process.poll() is None, process.communicate()[0][-3000:]
            return bool(list(out.glob("runs/*/params.yaml")))

        wait_until(started, 180, "the flow did not start")
        (server,) = [pid for pid, cmd in children(process.pid).items() if "prefect.server.api.server:create_app" in cmd]
        process.kill()  # SIGKILL to dcml alone: no atexit hook runs
        process.wait()  # not communicate(): the server holds the output pipe while it lives
        wait_until(lambda: not running(server), 10, "the temporary Prefect server outlived the killed dcml")
    finally:
        if process.poll() is None:
            process.kill()
        if server is not None and running(server):
            os.kill(server, signal.SIGKILL)
        process.stdout.close()


def test_the_watchdog_module_imports_nothing_but_the_standard_library():
    code = "import json, runpy, sys; runpy.run_path(sys.argv[1]); print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(REPO_ROOT / "flows" / "server_guard.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    top_level = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert not {"prefect", "torch", "numpy", "dcml", "flows", "tasks"} & top_level
