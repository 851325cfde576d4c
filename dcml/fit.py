"""In-process driver: the whole Divide-and-Conquer schedule in one Python call.

The Prefect flow (``flows/divide_and_conquer.py``) runs the same steps as separate
tasks across processes; this driver is for notebooks, tests and quick experiments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dcml.clustering import kmeans_seed
from dcml.config import Params, check_against_data
from dcml.data import DatasetBundle, retrieval_size
from dcml.division import Division, all_data, divide
from dcml.evaluate import evaluate_bundle
from dcml.schedule import Segment, plan_from_params
from dcml.train import EpochStats
from dcml.trainer import Trainer


@dataclass
class FitResult:
    trainer: Trainer
    epochs: list[EpochStats] = field(default_factory=list)
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (epochs done, metrics)
    divisions: list[tuple[int, Division]] = field(default_factory=list)  # (start epoch, division)


def next_division(
    trainer: Trainer, bundle: DatasetBundle, segment: Segment, previous: Division | None, division_index: int
) -> Division:
    """The division a segment trains on: re-clustered, kept, or all data (finetune)."""
    if segment.mode == "finetune":
        return all_data(len(bundle.splits.train))
    if not segment.recluster and previous is not None and previous.num_clusters == segment.num_clusters:
        return previous
    cluster = trainer.params.cluster
    embeddings, labels, _ = trainer.embed(
        bundle.train_eval, num_learners=segment.num_learners, features=cluster.space == "backbone"
    )
    keep_previous = previous is not None and previous.num_clusters == segment.num_clusters
    return divide(
        embeddings,
        labels,
        segment.num_clusters,
        cluster,
        seed=kmeans_seed(trainer.params.seed, division_index),
        previous=previous.assignment if keep_previous else None,
    )


def fit(
    params: Params,
    bundle: DatasetBundle,
    device: torch.device,
    *,
    evaluate_untrained: bool = True,
    on_epoch: Callable[[EpochStats], None] = lambda stats: None,
) -> FitResult:
    """Train with the schedule of ``params`` and evaluate after every segment."""
    check_against_data(params, bundle.splits.train.num_classes, retrieval_size(bundle.splits))
    trainer = Trainer.create(params, bundle.splits.train.num_classes, device)
    result = FitResult(trainer)
    if evaluate_untrained:
        result.evaluations.append((0, evaluate_bundle(trainer, bundle, segment_learners=params.cluster.num_learners)))
    division: Division | None = None
    for segment in plan_from_params(params):
        new_division = next_division(trainer, bundle, segment, division, len(result.divisions))
        if new_division is not division and segment.mode != "finetune":
            result.divisions.append((segment.start_epoch, new_division))
        division = new_division
        for stats in trainer.train_segment(segment, bundle.train, bundle.splits.train.labels, division):
            result.epochs.append(stats)
            on_epoch(stats)
        metrics = evaluate_bundle(trainer, bundle, segment_learners=segment.num_learners)
        result.evaluations.append((segment.end_epoch, metrics))
    return result
