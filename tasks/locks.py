"""Who owns a run folder: one process at a time.

A run folder ``<out>/runs/<name>`` is owned through ``<out>/.locks/<name>.lock``, a
sweep's MLflow state through ``<out>/.locks/sweep-<key>.lock``: an OS lock (``flock``,
through the ``filelock`` package) that the kernel drops when its process ends — also by
``kill -9`` — so a dead holder never blocks anyone. The file names its holder (pid, host,
command, start, Prefect flow run) for the message a second process gets; it is emptied
when the holder releases it, and its content only counts while the OS lock is held.

The lock lives beside the run folder, not in it (as the MLflow state does, ``.tracking``):
``--fresh`` and a sweep's clean-up delete run folders, which must not delete the lock
that guards them, and DVC versions ``outputs/runs``, whose content must not depend on who
ran it. Lock files stay (empty) when their folder is deleted.

Forked children (DataLoader workers) do not hold the lock: ``flock`` belongs to the open
file, which a fork shares, so a worker that outlives a killed holder by the few seconds it
takes to notice would keep the run locked. Right after every fork the child closes its
copies of the lock files this process holds (``os.register_at_fork``; filelock >= 4.3 does
the same, this does not rely on it); the parent's lock is untouched.

Holds are per process and reentrant: the ``dcml`` command takes the lock before the
Prefect server starts and the flow takes it again (in a Prefect worker's flow-run
process, the flow's hold is the real one); a sweep holds its runs' locks while its
subflows run them. Several locks are taken in path order, so waiting processes cannot
deadlock.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

LOCKS = ".locks"
POLL_SECONDS = 0.5  # how often a waiting process tries again

_log = logging.getLogger(__name__)
_HELD: dict[int, tuple[int, int]] = {}  # descriptor -> (device, inode) of each lock file this process holds
Logger = logging.Logger | logging.LoggerAdapter


class BusyError(RuntimeError):
    """Another process owns what this one wants; the message names it (exit status 2)."""


def lock_file(out_dir: str | Path, name: str) -> Path:
    """``<out>/.locks/<name>.lock``."""
    return Path(out_dir) / LOCKS / f"{name}.lock"


def holder() -> dict[str, Any]:
    """This process, as a lock file names it."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(argv),
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "flow_run": _flow_run(),
    }


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names (None: empty or being written)."""
    for _ in range(20):  # a holder writes its name right after taking the lock
        try:
            data = json.loads(Path(path).read_text() or "null")
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            return data
        time.sleep(0.05)
    return None


def describe(path: Path) -> str:
    """``pid 123 on host h since <UTC time> (command: ...)``, or what is known."""
    info = read_holder(path)
    if info is None:
        return f"another process (lock file {path})"
    text = f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
    text += f" (command: {info.get('command')}"
    if info.get("flow_run"):
        text += f"; Prefect flow run {info['flow_run']}"
    return text + f"; lock file {path})"


@contextmanager
def hold(path: Path, what: str, wait: bool = False, logger: Logger | None = None) -> Iterator[None]:
    """Own ``what`` (through the lock file ``path``) while the block runs.

    When another process owns it: :class:`BusyError` naming that process, or with
    ``wait`` a warning and a wait until it ends."""
    lock = _lock(Path(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        message = f"{what} is in use by {describe(path)}"
        if not wait:
            raise BusyError(f"{message}; wait until it ends, or pass --wait to wait for it") from None
        (logger or _log).warning("%s; waiting until it ends (--wait)", message)
        lock.acquire()
    try:
        yield
    finally:
        _release(lock)


@contextmanager
def hold_all(items: Iterable[tuple[Path, str]], wait: bool = False, logger: Logger | None = None) -> Iterator[None]:
    """:func:`hold` each ``(lock file, what)``, in path order; all or none."""
    with ExitStack() as stack:
        for path, what in sorted(items, key=lambda item: str(item[0])):
            stack.enter_context(hold(path, what, wait, logger))
        yield


@contextmanager
def try_hold(path: Path) -> Iterator[bool]:
    """Own the lock if nobody else does: yields True while owned, False (at once) when
    another process holds it."""
    lock = _lock(Path(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        _release(lock)


def _lock(path: Path) -> FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    # one instance per path in this process (reentrant, whichever thread); the file stays
    return FileLock(
        path,
        is_singleton=True,
        thread_local=False,
        preserve_lock_file=True,
        fallback_to_soft=False,
        poll_interval=POLL_SECONDS,
        on_acquired=_write_holder,
    )


def _write_holder(fd: int) -> None:
    data = json.dumps(holder()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    info = os.fstat(fd)
    _HELD[fd] = (info.st_dev, info.st_ino)


def _release(lock: FileLock) -> None:
    if lock.lock_counter == 1:  # the last hold in this process: the file no longer names us
        os.truncate(lock.lock_file, 0)
        info = os.stat(lock.lock_file)
        for fd in [fd for fd, identity in _HELD.items() if identity == (info.st_dev, info.st_ino)]:
            del _HELD[fd]
    lock.release()


def _close_in_child() -> None:
    """After a fork, in the child: close the inherited descriptors of held lock files, so
    that the lock ends with its holder (``flock`` is shared through them). Never unlock:
    that would release the parent's lock."""
    for fd, identity in list(_HELD.items()):
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) == identity:
                os.close(fd)
        except OSError:  # already closed (filelock's own fork hook)
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _flow_run() -> str | None:
    try:
        from prefect.runtime import flow_run

        return f"{flow_run.name} ({flow_run.id})" if flow_run.id else None
    except Exception:  # noqa: BLE001 - a name for a message, never a reason to fail
        return None


def other_holders(out_dir: str | Path, pattern: str, except_name: str) -> list[str]:
    """Descriptions of the holders of ``<out>/.locks/<pattern>.lock`` other than ``except_name``'s
    that another process holds now (e.g. the sweeps running in ``out_dir``)."""
    held = []
    for path in sorted((Path(out_dir) / LOCKS).glob(f"{pattern}.lock")):
        if path.stem == except_name:
            continue
        with try_hold(path) as owned:
            if not owned:
                held.append(describe(path))
    return held
