"""Prefect tasks of one Divide-and-Conquer run. Paths in, paths out.

Each task first checks whether its output file already exists: files are written
atomically, so an existing file is complete and a rerun after a crash skips the work
(and says so in its log). Progress goes to the task run's log (the Prefect UI): loss
and img/s per epoch, cluster sizes and dropped images per division, R@k per evaluation.
Each task is tagged with its kind (``train``, ``cluster``, ...); the flow adds the run's
tags (``dcml``, ``K4``, ``seed0``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import task_run

from dcml.clustering import kmeans_seed
from dcml.device import available_cpus
from dcml.division import all_data, next_division
from dcml.evaluate import evaluate_embeddings
from dcml.schedule import Segment
from dcml.trainer import Trainer
from tasks import distributed_train, io, retention
from tasks.layout import RunLayout
from tasks.progress import bar
from tasks.runs import bundle_for, device_for, run_params


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (shown in the Prefect UI); a plain logger outside Prefect."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dcml.tasks")


def _reused(path: Path) -> str:
    """One log line for work a rerun skips because its output exists."""
    _logger().info("%s: output exists (%s), skipped", task_run.get_name() or "task", path)
    return str(path)


@task(name="init-model", task_run_name="init-model", cache_policy=NO_CACHE, tags=["init"])
def init_model(run_dir: str) -> str:
    """The untrained model (epoch 0): backbone weights loaded, embedding initialised."""
    layout = RunLayout(Path(run_dir))
    path = layout.checkpoint(0)
    if path.exists():
        return _reused(path)
    params = run_params(layout)
    bundle = bundle_for(params)
    Trainer.create(params, bundle.splits.train.num_classes, device_for(params)).save(path)
    return str(path)


@task(name="embed", task_run_name="embed-{split}-epoch-{epoch}", cache_policy=NO_CACHE, tags=["embed"])
def embed(run_dir: str, checkpoint: str, split: str, epoch: int, num_learners: int) -> str:
    """Embed the ``train`` (eval transforms) or ``test`` split; Parquet out."""
    layout = RunLayout(Path(run_dir))
    path = layout.embeddings(split, epoch)
    if path.exists():
        return _reused(path)
    params = run_params(layout)
    bundle = bundle_for(params)
    trainer = Trainer.for_inference(checkpoint, device_for(params), params=params)
    dataset = bundle.train_eval if split == "train" else bundle.test
    features = split == "train" and params.cluster.space == "backbone"
    embeddings, labels, indices = trainer.embed(
        dataset, num_learners=num_learners, features=features, progress=bar(f"embed {split} (epoch {epoch})")
    )
    io.write_embeddings(
        path,
        embeddings,
        labels,
        indices,
        split=split,
        epoch=epoch,
        num_learners=num_learners,
        features=features,
    )
    _logger().info("embedded %d %s images (%d-d, %d slices)", len(labels), split, embeddings.shape[1], num_learners)
    return str(path)


@task(name="cluster", task_run_name="cluster-epoch-{epoch}", cache_policy=NO_CACHE, tags=["cluster"])
def cluster(
    run_dir: str, embeddings: str, previous: str | None, num_clusters: int, division_index: int, epoch: int
) -> str:
    """k-means into learners' data, matched to the previous division (Hungarian)."""
    layout = RunLayout(Path(run_dir))
    path = layout.division(epoch)
    if path.exists():
        return _reused(path)
    params = run_params(layout)
    vectors, labels, _, _ = io.read_embeddings(embeddings)
    before = io.read_division(previous) if previous else None
    seed = kmeans_seed(params.seed, division_index)
    division = next_division(vectors, labels, num_clusters, params.cluster, seed=seed, previous=before)
    io.write_division(path, division, labels, epoch=epoch, division_index=division_index)
    retention.prune_run(layout, params)  # the train embeddings are consumed
    sizes = np.bincount(division.assignment[division.keep], minlength=division.num_clusters)
    stats = division.stats
    _logger().info(
        "division %d: %d clusters, images per learner %s, %d images dropped%s",
        division_index,
        division.num_clusters,
        sizes.tolist(),
        int(stats.get("images_dropped", 0)),
        f", NMI to previous {stats['nmi_to_previous']:.3f}" if "nmi_to_previous" in stats else "",
    )
    return str(path)


@task(name="train", task_run_name="train-{segment.name}", cache_policy=NO_CACHE, tags=["train"])
def train(run_dir: str, checkpoint: str, division: str | None, segment: Segment) -> str:
    """Train one segment from ``checkpoint``; writes the end checkpoint and epoch stats."""
    layout = RunLayout(Path(run_dir))
    path = layout.checkpoint(segment.end_epoch)
    if path.exists():
        return _reused(path)
    params = run_params(layout)
    if params.train.nproc_per_node > 1:  # data-parallel: torchrun, rank 0 writes (tasks/distributed_train.py)
        _train_distributed(layout, checkpoint, division, segment, params.train.nproc_per_node)
        retention.prune_run(layout, params)
        return str(path)
    bundle = bundle_for(params)
    trainer = Trainer.from_checkpoint(checkpoint, device_for(params), params=params)
    learners_data = io.read_division(division) if division else all_data(len(bundle.splits.train))
    trainer.train_segment(  # one loader for the whole segment: its workers persist across epochs
        segment,
        bundle.train,
        bundle.splits.train.labels,
        learners_data,
        progress=bar(f"epochs {segment.start_epoch}-{segment.end_epoch - 1}"),
        on_epoch=lambda stats: _epoch_done(layout, stats, segment.mode),
    )
    trainer.save(path)
    retention.prune_run(layout, params)  # older checkpoints are consumed
    return str(path)


# Set by an outer launcher (torchrun, a Kubeflow PyTorchJob, Slurm): not for our own torchrun
OUTER_DISTRIBUTED_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _train_distributed(layout: RunLayout, checkpoint: str, division: str | None, segment: Segment, nproc: int) -> None:
    """The segment on ``nproc`` processes under torchrun; their output goes to the task's log."""
    cpus = available_cpus()
    env = {k: v for k, v in os.environ.items() if k not in OUTER_DISTRIBUTED_ENV and not k.startswith("TORCHELASTIC_")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // nproc)))
    logger = _logger()
    logger.info("training %s on %d processes (torchrun)", segment.name, nproc)
    command = distributed_train.command(str(layout.root), checkpoint, division, segment)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    try:
        for line in process.stdout:
            logger.info("%s", line.rstrip())
        process.wait()
    except BaseException:  # cancelled, interrupted: torchrun stops its ranks on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    finally:
        process.stdout.close()
    path = layout.checkpoint(segment.end_epoch)
    if process.returncode != 0 or not path.exists():
        raise RuntimeError(
            f"distributed training of {segment.name} failed (exit status {process.returncode}); see the log"
        )


def _epoch_done(layout: RunLayout, stats, mode: str) -> None:
    io.write_json(layout.epoch_stats(stats.epoch), {**stats.as_dict(), "mode": mode})
    _logger().info(
        "epoch %d (%s): loss %.4f, %.0f img/s, %.1f s",
        stats.epoch,
        mode,
        stats.loss,
        stats.images_per_second,
        stats.seconds,
    )


@task(name="evaluate", task_run_name="evaluate-epoch-{epoch}", cache_policy=NO_CACHE, tags=["evaluate"])
def evaluate(run_dir: str, embeddings: str, epoch: int) -> str:
    """R@k, NMI, MAP@R, R-precision of the test embeddings; JSON out."""
    layout = RunLayout(Path(run_dir))
    path = layout.evaluation(epoch)
    if path.exists():
        return _reused(path)
    params = run_params(layout)
    vectors, labels, _, meta = io.read_embeddings(embeddings)
    final = epoch == params.train.epochs
    metrics = evaluate_embeddings(
        vectors, labels, bundle_for(params).splits, params.eval, seed=params.seed, final=final
    )
    io.write_json(path, {"epoch": epoch, **metrics, "num_slices": meta["num_learners"]})
    retention.prune_run(layout, params)  # older test embeddings are consumed
    numbers = {key: value for key, value in metrics.items() if isinstance(value, int | float | np.floating)}
    shown = [key for key in numbers if key.startswith(("recall@", "map@", "nmi"))]
    _logger().info("epoch %d: %s", epoch, ", ".join(f"{key} {100 * metrics[key]:.2f}" for key in shown))
    return str(path)
