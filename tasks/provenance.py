"""Which code and which data computed a run.

Code: git commit and a digest of the Python sources. A run folder is not keyed on the
code, so a rerun after a code change continues the run; :func:`record_code_version`
appends to ``<run>/code_versions.json`` the epoch from which the current code took over,
and the tracking tags name the current version.

Data: :func:`data_version` is part of the run's key — the DVC hash of ``data.root`` when a
``.dvc`` file tracks it, else a digest of the split's file list and labels — so a run
never continues on other data.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from dcml.config import DataConfig
from dcml.data import load_splits
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


def rewind_code_versions(layout: RunLayout, epoch: int) -> None:
    """Forget the code versions that took over after ``epoch``: a run rewound to ``epoch``
    (``tasks.integrity``) recomputes those epochs, and :func:`record_code_version` then
    records the code that does."""
    if layout.code_versions.is_file():
        history = io.read_json(layout.code_versions)
        kept = [entry for entry in history if entry["from_epoch"] <= epoch]
        if kept != history:
            io.write_json(layout.code_versions, kept)


def dvc_version(data_root: str) -> str:
    """The DVC hash of the dataset folder, read from the ``.dvc`` file that tracks it
    (``data.dvc`` of the project, or ``<root>.dvc`` next to the folder); ``untracked``."""
    root = Path(data_root).resolve()
    candidates = [Path("data.dvc"), root.with_name(root.name + ".dvc")]
    for dvc_file in candidates:
        if not dvc_file.is_file():
            continue
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []):
            if (dvc_file.parent / out.get("path", "")).resolve() == root:
                return str(out.get("md5", "unknown"))
    return "untracked"


@lru_cache(maxsize=8)
def data_version(data: DataConfig) -> str:
    """``dvc:<md5>`` for DVC-tracked data (its content), else ``files:<digest>`` of every
    split's image paths (relative to ``data.root``) and labels — a changed file list,
    split or labelling is other data; a file rewritten in place is caught by DVC only."""
    tracked = dvc_version(data.root)
    if tracked not in ("untracked", "unknown"):
        return f"dvc:{tracked}"
    splits = load_splits(data)
    digest = hashlib.sha256()
    for name in ("train", "test", "query", "gallery"):
        records = getattr(splits, name, None)
        if records is None:
            continue
        digest.update(f"[{name}]\n".encode())
        for path, label in zip(records.paths, records.labels.tolist(), strict=True):
            digest.update(f"{os.path.relpath(path, data.root)}\t{label}\n".encode())
    return f"files:{digest.hexdigest()[:16]}"
