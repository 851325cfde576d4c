"""The temporary Prefect server a ``dcml`` command starts when no ``PREFECT_API_URL`` is set.

Prefect starts it as a child in the command's process group, so a Ctrl-C in the terminal
reaches the server too: it dies at once, and the flow, recording its crash, then retries
against a dead API for minutes. In a process group of its own the server only hears
``dcml``: the flow records the interruption, ``dcml`` prints one line and stops the
server on exit (Prefect's ``atexit`` hook).
"""

from __future__ import annotations

import functools
import subprocess
import types


def own_process_group() -> None:
    """Start Prefect's temporary server (if one is needed) in its own process group."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:  # a real server: nothing is started
        return
    from prefect.server.api import server

    cls = server.SubprocessASGIServer
    if getattr(cls._run_uvicorn_command, "dcml_own_group", False):
        return
    original = cls._run_uvicorn_command
    shim = types.SimpleNamespace(Popen=functools.partial(subprocess.Popen, process_group=0))

    @functools.wraps(original)
    def run_uvicorn_command(self: server.SubprocessASGIServer) -> subprocess.Popen:
        # only this call's ``subprocess.Popen`` (the module global of prefect's server module)
        server.subprocess = shim
        try:
            return original(self)
        finally:
            server.subprocess = subprocess

    run_uvicorn_command.dcml_own_group = True  # type: ignore[attr-defined]
    cls._run_uvicorn_command = run_uvicorn_command
