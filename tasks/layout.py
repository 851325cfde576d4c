"""Where a run keeps its files. Every name is a function of the epoch, so a rerun finds
what an interrupted run already finished and skips it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def checkpoint(self, epoch: int) -> Path:
        return self.root / "checkpoints" / f"epoch-{epoch:04d}.pt"

    def embeddings(self, split: str, epoch: int) -> Path:
        return self.root / "embeddings" / f"{split}-epoch-{epoch:04d}.parquet"

    def division(self, epoch: int) -> Path:
        return self.root / "divisions" / f"division-epoch-{epoch:04d}.parquet"

    def epoch_stats(self, epoch: int) -> Path:
        return self.root / "history" / f"train-epoch-{epoch:04d}.json"

    def evaluation(self, epoch: int) -> Path:
        return self.root / "history" / f"eval-epoch-{epoch:04d}.json"

    @property
    def final_metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def tracking_state(self) -> Path:
        """The run's MLflow ids: outside the run folder, which DVC versions, so that the
        folder's content depends only on params, code and data."""
        return self.root.parent.parent / ".tracking" / f"{self.root.name}.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def params_digest(params_dict: dict) -> str:
    """Short stable hash of what a run computes: its params and the code that computes it.

    Changed params or changed code get a fresh run folder, so resuming never mixes in
    results of other settings (DVC reruns the stage on a code change; this makes the
    tasks recompute too). ``tracking`` and ``sweep`` do not change a run's results and
    are left out: a sweep with another K list reuses the runs it shares with the last.
    """
    relevant = {k: v for k, v in params_dict.items() if k not in ("tracking", "sweep")}
    text = json.dumps(relevant, sort_keys=True) + code_digest()
    return hashlib.sha256(text.encode()).hexdigest()[:8]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the Python sources of ``dcml``, ``tasks`` and ``flows``."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in ("dcml", "tasks", "flows"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_name(num_learners: int, seed: int) -> str:
    return f"K{num_learners}-seed{seed}"
