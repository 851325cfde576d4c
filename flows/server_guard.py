"""Prefect's temporary server stops when the ``dcml`` process that started it dies.

Without ``PREFECT_API_URL`` a flow run starts Prefect's temporary ("ephemeral") API
server: ``prefect.server.api.server.SubprocessASGIServer`` runs uvicorn as a child process
and stops it from an ``atexit`` hook. A process killed with SIGKILL (or SIGTERM, or by the
OOM killer) runs no hook, so the server — about 200 MB and a port — used to outlive it.

:func:`install` wraps the method that starts the server process so that a watchdog
starts next to it: this file, run as a stdlib-only Python process (``-I -S``, a few MB)
in a session of its own, so that neither Ctrl-C, a closed terminal nor a ``kill`` of the
command's process group ends it before the server. Five times a second it checks
whether its parent — the process that started the server — is still there (when it dies,
the watchdog is re-parented and ``os.getppid()`` changes); then it stops the server
(SIGTERM, SIGKILL after 5 s) and exits. It also exits as soon as the server stops, as it
does on a normal exit (Prefect's ``atexit`` hook). It composes with
``flows.server.own_process_group`` (which starts the server in a process group of its own).

Why not ``prctl(PR_SET_PDEATHSIG)`` in the server: Prefect's ``Popen`` of the server takes
no ``preexec_fn``; the signal is Linux-only; and it fires when the *thread* that started
the server ends, while Prefect may start it from a worker thread.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.2
GRACE_SECONDS = 5.0


def install() -> None:
    """Give every temporary Prefect server this process starts from now on a watchdog.
    Does nothing when ``PREFECT_API_URL`` names a server (no temporary one is started)."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return
    from prefect.server.api import server

    cls = server.SubprocessASGIServer
    if getattr(cls._run_uvicorn_command, "dcml_watchdog", False):
        return
    original = cls._run_uvicorn_command

    @functools.wraps(original)
    def run_uvicorn_command(self: server.SubprocessASGIServer) -> subprocess.Popen:
        process = original(self)
        self._dcml_watchdog = start_watchdog(process.pid)
        return process

    run_uvicorn_command.dcml_watchdog = True  # type: ignore[attr-defined]
    cls._run_uvicorn_command = run_uvicorn_command


def start_watchdog(pid: int) -> subprocess.Popen:
    """A process that stops ``pid`` when this process dies (and ends when ``pid`` does)."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def watch(parent: int, pid: int) -> None:
    """Until ``pid`` ends: when ``parent`` is no longer this process's parent, stop ``pid``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's signals are for dcml
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    started = _start_time(pid)
    while _alive(pid, started):
        if os.getppid() != parent:
            _stop(pid, started)
            return
        time.sleep(POLL_SECONDS)


def _stop(pid: int, started: str | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            if not _alive(pid, started):
                return
            time.sleep(0.05)


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux ``/proc``), so that a reused pid is not taken for it."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if started is None:
        return True
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started  # a zombie has stopped; another start time: another process


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
