"""Which code computed a run: git commit and a digest of the Python sources.

A run folder is keyed on params only, so a rerun after a code change continues the run;
:func:`record_code_version` appends to ``<run>/code_versions.json`` the epoch from which
the current code took over, and the tracking tags name the current version.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks import io
from tasks.layout import RunLayout

SOURCE_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (16 hex digits) of the Python sources of ``dcml``, ``tasks`` and ``flows``."""
    digest = hashlib.sha256()
    for package in ("dcml", "tasks", "flows"):
        for path in sorted((SOURCE_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(SOURCE_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout the sources come from, ``+dirty`` with uncommitted changes;
    ``unknown`` outside a git checkout."""
    try:

        def git(*args: str) -> str:
            out = subprocess.run(
                ["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, check=True, timeout=10
            )
            return out.stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "dcml", "tasks", "flows")
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_version() -> dict[str, str]:
    return {"source_digest": source_digest(), "git_commit": git_commit()}


def record_code_version(layout: RunLayout, from_epoch: int) -> list[dict[str, Any]]:
    """Append the current code version to the run's history unless it is the last entry.

    ``from_epoch``: the first epoch this invocation computes (the resume point).
    Returns the history, oldest first.
    """
    history = io.read_json(layout.code_versions) if layout.code_versions.is_file() else []
    current = code_version()
    if not history or {k: history[-1][k] for k in current} != current:
        history.append({**current, "from_epoch": from_epoch, "since": datetime.now(UTC).isoformat(timespec="seconds")})
        io.write_json(layout.code_versions, history)
    return history
