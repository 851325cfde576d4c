"""Atomic, durable file writes: write to a temporary sibling, then rename over the target.

A crash never leaves a half-written file under the final name, so a rerun can trust
every file that exists. A power loss or kernel crash neither: :func:`atomic_path` flushes
the file to the disk (``fsync``) before the rename and the folder (the rename itself)
after it, so once it returns the file is on the disk under its name — a caller may then
delete what the new file replaces (the previous checkpoint, say).

File modes are set per file from the process umask, read once at import: the umask is
never changed, not even for a moment (other threads — Prefect runs tasks in threads —
would create files with the wrong mode meanwhile).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Whether atomic_path flushes to the disk. Only benchmarks turn it off (bench/bench_fsync.py).
DURABLE = True


def _read_umask() -> int:
    """The process umask without changing it (Linux: /proc/self/status; elsewhere the
    classic set-and-restore, once, at import time)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would give a new file
DIR_MODE = 0o777 & ~UMASK


def fsync_dir(folder: str | Path) -> None:
    """Make renames, creations and deletions in ``folder`` durable."""
    if not DURABLE:
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as error:  # some filesystems cannot fsync a folder (EINVAL): nothing to flush there
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s content to the disk."""
    if not DURABLE:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: str | Path) -> None:
    """``mkdir -p`` whose new folders survive a crash (each new folder's parent is fsynced)."""
    missing, folder = [], Path(folder)
    while not folder.is_dir() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success flush it to the disk,
    rename it to ``path`` and flush the folder. When this returns, ``path`` is durable."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes owner-only files; use the usual mode
        fsync_file(tmp)  # the content is on the disk before the name points at it
        os.replace(tmp, path)
        fsync_dir(path.parent)  # and the name is too
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete temp files an interrupted :func:`atomic_path` left below ``folder``."""
    stale = list(Path(folder).rglob(".*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_atomic(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
