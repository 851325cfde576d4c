"""tqdm progress bars for epochs and embedding passes (written to stderr)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


def bar(description: str) -> Callable[[Iterable, int], Iterable]:
    def wrap(iterable: Iterable, total: int) -> Iterable:
        # disable=None: bars on a terminal, none in log files
        return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True, disable=None)

    return wrap


@contextmanager
def download_bar(description: str) -> Iterator[Callable[[int, int | None], None]]:
    """A byte progress bar fed with ``(bytes so far, total or None)`` (``dcml data fetch``)."""
    bar_ = tqdm(desc=description, unit="B", unit_scale=True, leave=False, dynamic_ncols=True, disable=None)

    def update(done: int, total: int | None) -> None:
        if total is not None and bar_.total != total:
            bar_.total = total
        bar_.n = done
        bar_.refresh()

    try:
        yield update
    finally:
        bar_.close()
