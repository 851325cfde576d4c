"""Ctrl-C while Prefect is between two states.

Python raises ``KeyboardInterrupt`` wherever the main thread is. Inside our code (a
task's work, the flow's control flow) Prefect handles it: the run is marked crashed and
the interrupt propagates. Inside Prefect's own bookkeeping (creating a task run,
proposing a state) it can turn into another error with a logged traceback (e.g.
``ValueError: Task run is not set``). So while Prefect's code runs (or a finaliser,
where Python would only print it), the interrupt waits — re-checked every 50 ms, at most
:data:`MAX_DEFER_S` — until our code runs again. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

MAX_DEFER_S = 3.0
RECHECK_S = 0.05
_ROOT = Path(__file__).resolve().parent.parent
_OURS = tuple(f"{_ROOT / package}{os.sep}" for package in ("dcml", "tasks", "flows"))
_PREFECT = f"{os.sep}prefect{os.sep}"


def must_wait(frame: FrameType | None) -> bool:
    """Whether an interrupt raised in ``frame`` would be lost or mishandled: in Prefect's
    code (:func:`in_prefect`), or where Python only prints it ("Exception ignored in"):
    a finaliser or importlib's module-lock callback."""
    if frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_name == "__del__"
    ):
        return True
    return in_prefect(frame)


def in_prefect(frame: FrameType | None) -> bool:
    """Whether the innermost frame that is ours or Prefect's is Prefect's (libraries
    either calls, such as typing or httpx, are looked through)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OURS):
            return False
        if _PREFECT in name:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def deferred_while_prefect_runs() -> Iterator[None]:
    """Within: SIGINT as described above (main thread only; restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    state: dict[str, Any] = {"pending_since": None, "recheck": False}

    def recheck_soon() -> None:
        time.sleep(RECHECK_S)
        if state["pending_since"] is not None:
            state["recheck"] = True
            _thread.interrupt_main(signal.SIGINT)

    def handler(signum: int, frame: FrameType | None) -> None:
        recheck, state["recheck"] = state["recheck"], False
        pending_since = state["pending_since"]
        if recheck and pending_since is None:
            return  # raised already
        if not recheck and pending_since is not None:
            state["pending_since"] = None  # Ctrl-C twice: at once
            raise KeyboardInterrupt
        now = time.monotonic()
        if must_wait(frame) and now - (pending_since or now) < MAX_DEFER_S:
            state["pending_since"] = pending_since or now
            threading.Thread(target=recheck_soon, daemon=True).start()
            return
        state["pending_since"] = None
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        state["pending_since"] = None
        signal.signal(signal.SIGINT, previous)
