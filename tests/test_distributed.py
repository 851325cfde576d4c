"""Data-parallel training (dcml/distributed.py, tasks/distributed_train.py).

The reference is the single-process run: with the same global batches, 2 gloo processes
under a real ``torchrun`` follow its loss trajectory and end with its weights. In float64
(frozen BatchNorm, no dropout) they agree to 1e-7 (measured: 7e-9 with masks, 1e-14 with
slices) — only the summation order differs; in
float32, Adam amplifies that rounding (measured: losses within 1.2e-3 relative after 3
epochs), which is why the comparison runs in float64.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dcml.config import ConfigError, load_params, params_from_dict, to_dict
from dcml.distributed import Shard
from dcml.train import EpochBatchSampler
from tasks import io
from tasks.layout import RunLayout, params_digest
from tests.conftest import REPO_ROOT, shrink
from tests.test_faults import dcml, finish, running, wait_until

WORKER = REPO_ROOT / "tests" / "distributed_worker.py"


@pytest.mark.parametrize("batch", [1, 2, 7, 9, 12, 32])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_batch_once_and_the_gather_restores_its_order(batch, world):
    shards = [Shard(rank, world) for rank in range(world)]
    positions = [list(shard.positions(batch)) for shard in shards]
    assert sorted(p for part in positions for p in part) == list(range(batch))  # each image once
    assert max(map(len, positions)) - min(map(len, positions)) <= 1
    assert shards[0].sizes(batch) == [len(part) for part in positions]
    concatenated = np.array([p for part in positions for p in part])  # what the all-gather yields
    assert concatenated[shards[0].gathered_order(batch)].tolist() == list(range(batch))


def test_every_rank_sees_every_class_of_a_batch():
    labels = np.repeat(np.arange(8), 4)  # P=8 classes x M=4 images, next to each other as batches are
    for rank in range(2):
        assert set(labels[list(Shard(rank, 2).positions(len(labels)))]) == set(range(8))


def test_the_ranks_load_the_global_batches_with_their_global_augmentation_seeds():
    batches = [(0, [5, 3, 9, 1, 4]), (1, [2, 8, 6, 7, 0, 11, 10])]
    single = EpochBatchSampler()
    single.set_epoch(batches, seed=17)
    ranks = [EpochBatchSampler(Shard(rank, 3)) for rank in range(3)]
    for sampler in ranks:
        sampler.set_epoch(batches, seed=17)
    for whole, *parts in zip(single, *ranks, strict=True):
        gathered = [item for part in parts for item in part]
        order = Shard(0, 3).gathered_order(len(whole))
        assert [gathered[i] for i in order] == whole  # indices and seeds, back in the batch's order


def run_worker(out: Path, nproc: int, freeze_bn: bool, learners: str) -> dict:
    env = {**os.environ, "DCML_TEST_FLOAT64": "1", "OMP_NUM_THREADS": "1"}
    args = [str(WORKER), str(out), "1" if freeze_bn else "0", learners]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        command = [sys.executable, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("learners", ["slices", "masks"])
def test_two_gloo_processes_follow_the_single_process_trajectory(tmp_path, learners):
    single = run_worker(tmp_path / "single.pt", 1, True, learners)
    ddp = run_worker(tmp_path / "ddp.pt", 2, True, learners)
    assert single["dtype"] == ddp["dtype"] == "torch.float64"  # the loss too keeps float64 (dcml.losses.margin)
    # the first step's gradients, compared directly (Adam would hide a constant factor)
    assert set(ddp["grads"]) == set(single["grads"]) and single["grads"]
    for name, grad in single["grads"].items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert ddp["images"] == single["images"]  # statistics of the global batches
    np.testing.assert_allclose(ddp["losses"], single["losses"], rtol=1e-7)  # measured: <= 7e-9
    assert set(ddp["state"]) == set(single["state"])
    for name, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=0, atol=1e-7, msg=name)
    # the run trained: the reference is not a model that never moved
    assert single["losses"][0] != single["losses"][-1]


def test_nproc_per_node_is_validated_and_keys_the_run_only_when_used():
    raw = to_dict(load_params(REPO_ROOT / "params.yaml"))
    for value, message in ((0, ">= 1"), (2 * raw["train"]["images_per_class"] + 1, "2 x train.images_per_class")):
        bad = {**raw, "train": {**raw["train"], "nproc_per_node": value}}
        with pytest.raises(ConfigError, match=message):
            params_from_dict(bad)
    without = {**raw, "train": {k: v for k, v in raw["train"].items() if k != "nproc_per_node"}}
    two = {**raw, "train": {**raw["train"], "nproc_per_node": 2}}
    assert params_digest(raw) == params_digest(without)  # runs from before the option keep their keys
    assert params_digest(two) != params_digest(raw)


# --- a real `dcml train` on 2 processes: killed during a segment, resumed -------------------


def rank_processes(run_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "tasks.distributed_train" in command and str(run_dir) in command and running(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_killed_two_process_segment_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_demo_root):
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    # K=1: one 4-epoch segment, so the kill lands inside it
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, nproc_per_node=2, epochs=4))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(params)))
    train = ("train", "--params", str(path), "-k", "1")

    finish(dcml(*train, "--out", str(tmp_path / "reference"), home=tmp_path / "home-0"))
    (reference,) = (tmp_path / "reference" / "runs").iterdir()
    expected = io.read_json(RunLayout(reference).final_metrics)

    out = tmp_path / "out"
    process = dcml(*train, "--out", str(out), home=tmp_path / "home-1")
    runs = out / "runs"
    wait_until(lambda: runs.is_dir() and any(runs.iterdir()), 300, "the run folder never appeared")
    (folder,) = runs.iterdir()
    layout = RunLayout(folder)
    wait_until(lambda: layout.epoch_stats(1).exists(), 300, "epoch 1 never ended")
    assert rank_processes(folder), "no rank is running"
    assert not layout.checkpoint(4).exists()
    os.kill(process.pid, signal.SIGKILL)  # the dcml process: the flow, the train task, torchrun's parent
    process.wait()
    wait_until(lambda: not rank_processes(folder), 30, "ranks outlived the killed run")

    finish(dcml(*train, "--out", str(out), home=tmp_path / "home-2"))
    assert not rank_processes(folder)
    metrics = io.read_json(layout.final_metrics)
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r"):
        assert metrics[key] == expected[key], key  # gloo on CPU: the same 2-process run, bit for bit
