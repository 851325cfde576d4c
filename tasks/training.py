"""Prefect tasks of one Divide-and-Conquer run. Paths in, paths out.

Each task first checks whether its output file already exists: files are written
atomically, so an existing file is complete and a rerun after a crash skips the work.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dcml.clustering import kmeans_seed
from dcml.division import all_data, next_division
from dcml.evaluate import evaluate_embeddings
from dcml.schedule import Segment
from dcml.trainer import Trainer
from tasks import io, retention
from tasks.layout import RunLayout
from tasks.progress import bar
from tasks.runs import bundle_for, device_for, run_params


@task(name="init-model", task_run_name="init-model", cache_policy=NO_CACHE)
def init_model(run_dir: str) -> str:
    """The untrained model (epoch 0): backbone weights loaded, embedding initialised."""
    layout = RunLayout(Path(run_dir))
    path = layout.checkpoint(0)
    if not path.exists():
        params = run_params(layout)
        bundle = bundle_for(params)
        Trainer.create(params, bundle.splits.train.num_classes, device_for(params)).save(path)
    return str(path)


@task(name="embed", task_run_name="embed-{split}-epoch-{epoch}", cache_policy=NO_CACHE)
def embed(run_dir: str, checkpoint: str, split: str, epoch: int, num_learners: int) -> str:
    """Embed the ``train`` (eval transforms) or ``test`` split; Parquet out."""
    layout = RunLayout(Path(run_dir))
    path = layout.embeddings(split, epoch)
    if path.exists():
        return str(path)
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
    return str(path)


@task(name="cluster", task_run_name="cluster-epoch-{epoch}", cache_policy=NO_CACHE)
def cluster(
    run_dir: str, embeddings: str, previous: str | None, num_clusters: int, division_index: int, epoch: int
) -> str:
    """k-means into learners' data, matched to the previous division (Hungarian)."""
    layout = RunLayout(Path(run_dir))
    path = layout.division(epoch)
    if path.exists():
        return str(path)
    params = run_params(layout)
    vectors, labels, _, _ = io.read_embeddings(embeddings)
    before = io.read_division(previous) if previous else None
    seed = kmeans_seed(params.seed, division_index)
    division = next_division(vectors, labels, num_clusters, params.cluster, seed=seed, previous=before)
    io.write_division(path, division, labels, epoch=epoch, division_index=division_index)
    retention.prune_run(layout, params)  # the train embeddings are consumed
    return str(path)


@task(name="train", task_run_name="train-{segment.name}", cache_policy=NO_CACHE)
def train(run_dir: str, checkpoint: str, division: str | None, segment: Segment) -> str:
    """Train one segment from ``checkpoint``; writes the end checkpoint and epoch stats."""
    layout = RunLayout(Path(run_dir))
    path = layout.checkpoint(segment.end_epoch)
    if path.exists():
        return str(path)
    params = run_params(layout)
    bundle = bundle_for(params)
    trainer = Trainer.from_checkpoint(checkpoint, device_for(params), params=params)
    learners_data = io.read_division(division) if division else all_data(len(bundle.splits.train))
    trainer.train_segment(  # one loader for the whole segment: its workers persist across epochs
        segment,
        bundle.train,
        bundle.splits.train.labels,
        learners_data,
        progress=bar(f"epochs {segment.start_epoch}-{segment.end_epoch - 1}"),
        on_epoch=lambda stats: io.write_json(
            layout.epoch_stats(stats.epoch), {**stats.as_dict(), "mode": segment.mode}
        ),
    )
    trainer.save(path)
    retention.prune_run(layout, params)  # older checkpoints are consumed
    return str(path)


@task(name="evaluate", task_run_name="evaluate-epoch-{epoch}", cache_policy=NO_CACHE)
def evaluate(run_dir: str, embeddings: str, epoch: int) -> str:
    """R@k, NMI, MAP@R, R-precision of the test embeddings; JSON out."""
    layout = RunLayout(Path(run_dir))
    path = layout.evaluation(epoch)
    if path.exists():
        return str(path)
    params = run_params(layout)
    vectors, labels, _, meta = io.read_embeddings(embeddings)
    final = epoch == params.train.epochs
    metrics = evaluate_embeddings(
        vectors, labels, bundle_for(params).splits, params.eval, seed=params.seed, final=final
    )
    io.write_json(path, {"epoch": epoch, **metrics, "num_slices": meta["num_learners"]})
    retention.prune_run(layout, params)  # older test embeddings are consumed
    return str(path)
