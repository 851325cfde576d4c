"""Where a run keeps its files. Every name is a function of the epoch, so a rerun finds
what an interrupted run already finished and skips it."""

from __future__ import annotations

from dataclasses import dataclass
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
        return self.root / "mlflow-run.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def params_digest(params_dict: dict) -> str:
    """Short stable hash of what a run computes: changed params get a fresh run folder.

    ``tracking`` and ``sweep`` do not change a run's results, so they are left out: a
    sweep with another K list reuses the runs it shares with the previous one.
    """
    import hashlib
    import json

    relevant = {k: v for k, v in params_dict.items() if k not in ("tracking", "sweep")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def run_name(num_learners: int, seed: int) -> str:
    return f"K{num_learners}-seed{seed}"
