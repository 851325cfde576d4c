"""Durable writes and locks that end with their holder: the order of a checkpoint save
(file fsync, rename, folder fsync, then the previous checkpoint's removal), file modes
without touching the process umask, and forked DataLoader workers that do not keep a
killed run's folder locked."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dcml import atomic
from dcml.config import load_params, to_dict
from dcml.schedule import steps_from_params
from dcml.trainer import Trainer
from tasks import io, locks, training
from tasks.layout import RunLayout
from tasks.runs import write_run_params
from tests.conftest import REPO_ROOT, shrink

CPU = torch.device("cpu")


def record_file_operations(monkeypatch) -> list[tuple[str, str]]:
    """(operation, path) for every fsync, rename and unlink from now on."""
    events: list[tuple[str, str]] = []
    fsync, replace, rename, unlink = os.fsync, os.replace, os.rename, os.unlink

    def on_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def on_replace(src, dst, *args, **kwargs):
        events.append(("rename", f"{src} -> {dst}"))
        return replace(src, dst, *args, **kwargs)

    def on_rename(src, dst, *args, **kwargs):
        events.append(("rename", f"{src} -> {dst}"))
        return rename(src, dst, *args, **kwargs)

    def on_unlink(path, *args, **kwargs):
        events.append(("unlink", str(path)))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", on_fsync)
    monkeypatch.setattr(os, "replace", on_replace)
    monkeypatch.setattr(os, "rename", on_rename)
    monkeypatch.setattr(os, "unlink", on_unlink)
    return events


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
def test_a_checkpoint_is_durable_before_the_previous_one_is_removed(tmp_path, tiny_params, monkeypatch):
    """The train task's real save-and-prune, with the training itself skipped."""
    layout = RunLayout(tmp_path / "runs" / "K4-seed0-test")
    write_run_params(tiny_params, layout)
    segment = steps_from_params(tiny_params)[-1].segment  # the fine-tuning segment, epochs 2-3, all data
    previous = Trainer.create(tiny_params, 10, CPU, load_pretrained=False).save(layout.checkpoint(segment.start_epoch))
    monkeypatch.setattr(Trainer, "train_segment", lambda self, *args, **kwargs: None)
    events = record_file_operations(monkeypatch)

    new = Path(training.train.fn(str(layout.root), str(previous), None, segment))

    assert new == layout.checkpoint(segment.end_epoch) and new.is_file() and not previous.exists()
    folder = str(new.parent)
    (tmp_sync,) = [i for i, (op, path) in enumerate(events) if op == "fsync" and f"/.{new.name}." in path]
    (rename,) = [i for i, (op, path) in enumerate(events) if op == "rename" and path.endswith(f" -> {new}")]
    folder_syncs = [i for i, (op, path) in enumerate(events) if op == "fsync" and path == folder]
    (removal,) = [i for i, (op, path) in enumerate(events) if op == "unlink" and path == str(previous)]
    assert events[tmp_sync][1] == events[rename][1].split(" -> ")[0]  # the temporary file that becomes it
    assert tmp_sync < rename < folder_syncs[0] < removal  # content, name, folder entry; then the old one goes
    assert removal == max(i for i, (op, _) in enumerate(events) if op in {"fsync", "rename", "unlink"})


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")
def test_every_atomic_write_flushes_the_file_then_its_folder(tmp_path, monkeypatch):
    events = record_file_operations(monkeypatch)
    path = io.write_json(tmp_path / "new" / "deeper" / "x.json", {"a": 1})
    ops = [(op, p) for op, p in events]
    rename_at = next(i for i, (op, _) in enumerate(ops) if op == "rename")
    tmp = ops[rename_at][1].split(" -> ")[0]
    assert ("fsync", tmp) in ops[:rename_at]
    assert ("fsync", str(path.parent)) in ops[rename_at:]
    # the folders it created are durable too: each new folder's parent was flushed
    assert ("fsync", str(tmp_path)) in ops and ("fsync", str(tmp_path / "new")) in ops


def test_file_modes_come_from_the_umask_read_once_never_changed(tmp_path, monkeypatch):
    mask = os.umask(0o022)
    os.umask(mask)
    assert atomic.UMASK == mask  # read at import from /proc/self/status, without changing it
    monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("atomic writes must not touch the process umask"))
    path = atomic.write_text_atomic(tmp_path / "x.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives a new file under this umask
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~mask


# --- forked loader workers and the run-folder lock ---------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
import torch
from torch.utils.data import DataLoader, Dataset
from tasks import locks

if sys.argv[2] == "neither":  # the control: no clean-up after fork at all
    import filelock._core._fork as fork
    fork._detach_child_state = lambda *args: None
elif sys.argv[2] == "ours":  # only tasks.locks' own after-fork hook
    import filelock._core._fork as fork
    original = fork._detach_child_state
    fork._detach_child_state = lambda descriptors, *args: original([], *args)

class Slow(Dataset):  # the first batch at once; then each worker sleeps in __getitem__, alive and
    def __len__(self):  # holding whatever it inherited, until the test kills it: no watchdog race
        return 10**6
    def __getitem__(self, i):
        if i >= 2:
            time.sleep(600)
        return i

with locks.hold(Path(sys.argv[1]), "the test's run"):
    if sys.argv[2] == "neither":
        locks._HELD.clear()  # our hook then finds nothing to close
    loader = iter(DataLoader(Slow(), batch_size=2, num_workers=2, persistent_workers=True))
    next(loader)  # both workers are forked and running
    print("held", flush=True)
    time.sleep(300)
"""


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("clean_up", ["both", "ours", "neither"])
def test_loader_workers_of_a_killed_holder_do_not_keep_its_lock(tmp_path, clean_up):
    """``both``: filelock's and tasks.locks' after-fork clean-up; ``ours``: tasks.locks'
    alone; ``neither``: the control, showing that workers would hold the lock."""
    path = tmp_path / ".locks" / "K4-seed0-abc.lock"
    with locks.try_hold(tmp_path / "warm-up.lock"):  # filelock's first use is slow: not inside the timing
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), clean_up],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    workers: list[int] = []
    try:
        assert holder.stdout.readline().strip() == "held"
        workers = children(holder.pid)
        assert len(workers) == 2
        holder.kill()  # kill -9 of the holder alone; its workers live on, busy in __getitem__
        holder.wait()
        with locks.try_hold(path) as owned:
            still_running = [pid for pid in workers if alive(pid)]
        assert still_running, "the workers ended before the lock was tried: the test proves nothing"
        assert owned == (clean_up != "neither")
    finally:
        holder.kill()
        holder.stdout.close()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def dcml_train(params: Path, out: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "train", "--params", str(params), "--out", str(out)]
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_an_immediate_rerun_after_kill_9_of_a_run_with_loader_workers_is_not_refused(tmp_path, tiny_demo_root):
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = dataclasses.replace(
        params,
        data=dataclasses.replace(params.data, num_workers=2),
        train=dataclasses.replace(params.train, epochs=50),  # outlasts the test
    )
    params_path, out = tmp_path / "params.yaml", tmp_path / "out"
    params_path.write_text(yaml.safe_dump(to_dict(params)))
    with locks.try_hold(tmp_path / "warm-up.lock"):
        pass
    first = dcml_train(params_path, out, tmp_path / "home-1")
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while len(workers) < 2:  # training: the flow process has forked its loader workers
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.2)
            workers = [pid for pid in children(first.pid) if _is_loader_worker(pid, first.pid)]
        (lock,) = out.glob(".locks/K*.lock")
        first.kill()  # kill -9 of dcml alone: its loader workers live on for a few seconds
        first.wait()
        with locks.try_hold(lock) as owned:
            assert owned, (
                f"the run is still locked after its holder died (workers alive: {[alive(w) for w in workers]})"
            )
        second = dcml_train(params_path, out, tmp_path / "home-2")
        try:
            while (locks.read_holder(lock) or {}).get("pid") != second.pid:  # it took the run
                assert second.poll() is None, second.communicate()[0].decode()[-3000:]
                time.sleep(0.1)
        finally:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        first.stdout.close()


def _is_loader_worker(pid: int, parent: int) -> bool:
    """A forked child running Python (not the Prefect server or its watchdog, which exec)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() == Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return False
