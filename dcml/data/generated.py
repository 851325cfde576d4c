"""Generated datasets written all or nothing: a sibling temp folder renamed into place,
with a ``.complete`` marker holding the generator's settings (demo and SOP-like data)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dcml.data.errors import DatasetError

MARKER = ".complete"


def is_complete(root: Path, settings: dict, what: str) -> bool:
    """True for a finished folder with ``settings``; raises if ``root`` holds other data.

    ``what`` names the dataset in the messages (e.g. ``demo dataset``).
    """
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    marker = root / MARKER
    if not marker.is_file():
        raise DatasetError(f"{root} exists and is not a complete {what}; refusing to overwrite it")
    found = json.loads(marker.read_text())
    if found != settings:
        raise DatasetError(f"{what} {root} was generated with {found}, not {settings}; remove it first")
    return True


def write_generated(root: Path, settings: dict, what: str, write: Callable[[Path], None]) -> bool:
    """``write(folder)`` into a temp folder next to ``root``, add the marker, rename it to
    ``root``. Returns False (nothing written) when a complete ``root`` with ``settings``
    exists; an empty ``root`` is replaced; a concurrent twin finishing first is accepted."""
    if is_complete(root, settings, what):
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
    try:
        write(temp)
        (temp / MARKER).write_text(json.dumps(settings, sort_keys=True))
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        temp.rename(root)
    except OSError:
        if not is_complete(root, settings, what):  # not a concurrent twin finishing first
            raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return True
