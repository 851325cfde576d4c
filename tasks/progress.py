"""tqdm progress bars for epochs and embedding passes (written to stderr)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tqdm.auto import tqdm


def bar(description: str) -> Callable[[Iterable, int], Iterable]:
    def wrap(iterable: Iterable, total: int) -> Iterable:
        # disable=None: bars on a terminal, none in log files
        return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True, disable=None)

    return wrap
