"""Where a run keeps its files. Every name is a function of the epoch, so a rerun finds
what an interrupted run already finished and skips it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dcml.config import HIERARCHY_KEYS, MASK_KEYS


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def checkpoint(self, epoch: int) -> Path:
        return self.root / "checkpoints" / f"epoch-{epoch:04d}.pt"

    def checkpoints(self) -> dict[int, Path]:
        """Epoch → checkpoint file, for the checkpoints on disk (complete: written atomically)."""
        return _by_epoch(self.root / "checkpoints", "epoch-*.pt")

    def latest_checkpoint_epoch(self) -> int | None:
        """The epoch a rerun continues from: the newest checkpoint, None before any."""
        return max(self.checkpoints(), default=None)

    def embedding_files(self, split: str) -> dict[int, Path]:
        return _by_epoch(self.root / "embeddings", f"{split}-epoch-*.parquet")

    def divisions(self) -> dict[int, Path]:
        return _by_epoch(self.root / "divisions", "division-epoch-*.parquet")

    def evaluations(self) -> dict[int, Path]:
        return _by_epoch(self.root / "history", "eval-epoch-*.json")

    def epoch_stats_files(self) -> dict[int, Path]:
        return _by_epoch(self.root / "history", "train-epoch-*.json")

    @property
    def code_versions(self) -> Path:
        """Which code (git commit, source digest) computed which epochs of the run."""
        return self.root / "code_versions.json"

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
    def lock(self) -> Path:
        """Who owns the run folder (``tasks.locks``): beside it, like the MLflow state, so
        that deleting the folder (``--fresh``, a sweep's clean-up) keeps the lock."""
        return self.root.parent.parent / ".locks" / f"{self.root.name}.lock"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


# Keys that do not change what a run computes: they are left out of the run's key, so
# changing them continues the same run. (``data.num_workers`` does not: every image's
# augmentation is seeded on its own, see dcml.train.EpochBatchSampler.)
NOT_RESULT_KEYS = ("tracking", "sweep", "retrieval", "train.keep_checkpoints", "data.num_workers")


# Options that are off leave the hash: their keys act only when switched on, so adding
# such an option to dcml keeps the keys (and the resume) of every earlier run.
INACTIVE_UNLESS = {("model", "learners", "masks"): MASK_KEYS, ("cluster", "hierarchical", True): HIERARCHY_KEYS}


# Keys left out while they hold their default, so runs from before they existed keep their keys.
DEFAULT_LEAVES_HASH = {("train", "nproc_per_node"): 1, ("model", "mask_split_state"): "inherit"}


def _inactive_keys(params_dict: dict) -> tuple[str, ...]:
    inactive: tuple[str, ...] = tuple(
        f"{section}.{key}"
        for (section, key), default in DEFAULT_LEAVES_HASH.items()
        if params_dict.get(section, {}).get(key, default) == default
    )
    for (section, key, active), keys in INACTIVE_UNLESS.items():
        if params_dict.get(section, {}).get(key, None) != active:
            inactive += keys
    return inactive


def params_digest(params_dict: dict, device_type: str = "cpu", data_version: str | None = None) -> str:
    """Short stable hash of what a run computes: the params that change its results.

    The code is deliberately not part of it: a rerun after a code fix continues from
    the run's last checkpoint (``--fresh`` starts over); the code version of each part of
    the run is recorded (``tasks.provenance``). DVC decides *whether* the stage reruns
    (its deps include the code), the run folder decides *from where*.

    ``device_type``: the resolved device (``train.device: auto`` may mean either). A run
    on a GPU computes differently (bf16, TF32, cuDNN act on CUDA only), so it is another
    run than the same params on a CPU; CPU keys carry no device (as before).
    ``data_version`` (``tasks.provenance.data_version``): a run never continues on other data.
    """
    relevant = json.loads(json.dumps(params_dict))  # a deep copy
    for key in NOT_RESULT_KEYS + _inactive_keys(relevant):
        *parents, leaf = key.split(".")
        node = relevant
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    if device_type != "cpu":
        relevant["device_type"] = device_type
    if data_version is not None:
        relevant["data_version"] = data_version
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


def _by_epoch(folder: Path, pattern: str) -> dict[int, Path]:
    """Files named ``<prefix>-epoch-NNNN.<ext>`` (or ``epoch-NNNN.pt``) by their epoch."""
    files = {}
    for path in folder.glob(pattern) if folder.is_dir() else []:
        number = path.name.split(".")[0].rsplit("-", 1)[-1]
        if number.isdigit():
            files[int(number)] = path
    return files


def run_name(num_learners: int, seed: int) -> str:
    return f"K{num_learners}-seed{seed}"
