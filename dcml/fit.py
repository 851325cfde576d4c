"""In-process driver: the whole Divide-and-Conquer schedule in one Python call.

The Prefect flow (``flows/divide_and_conquer.py``) runs the same steps as separate
tasks across processes; this driver is for notebooks, tests and quick experiments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dcml import division as division_rules
from dcml.clustering import kmeans_seed
from dcml.config import ConfigError, Params, check_against_data
from dcml.data import DatasetBundle, retrieval_size
from dcml.division import Division, all_data
from dcml.evaluate import evaluate_bundle
from dcml.schedule import Step, steps_from_params
from dcml.train import EpochStats
from dcml.trainer import Trainer


@dataclass
class FitResult:
    trainer: Trainer
    epochs: list[EpochStats] = field(default_factory=list)
    evaluations: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (epochs done, metrics)
    divisions: list[tuple[int, Division]] = field(default_factory=list)  # (start epoch, division)


def division_for_step(trainer: Trainer, bundle: DatasetBundle, step: Step, previous: Division | None) -> Division:
    """The division a step trains on: a new clustering, the previous one, or all data."""
    if step.division == "all":
        return all_data(len(bundle.splits.train))
    if step.division == "previous":
        assert previous is not None, "a 'previous' step always follows a 'new' one"
        return previous
    segment, cluster = step.segment, trainer.params.cluster
    embeddings, labels, _ = trainer.embed(
        bundle.train_eval, num_learners=step.cluster_slices, features=cluster.space == "backbone"
    )
    seed = kmeans_seed(trainer.params.seed, step.division_index)
    return division_rules.next_division(embeddings, labels, segment.num_clusters, cluster, seed=seed, previous=previous)


def fit(
    params: Params,
    bundle: DatasetBundle,
    device: torch.device,
    *,
    evaluate_untrained: bool = True,
    on_epoch: Callable[[EpochStats], None] = lambda stats: None,
) -> FitResult:
    """Train with the schedule of ``params``, evaluating at the cadence of ``eval.every_epochs``."""
    if params.train.nproc_per_node > 1:
        raise ConfigError(
            "fit() trains in this one process; train.nproc_per_node > 1 runs through the pipeline "
            "(`dcml train`, which launches torchrun per segment)"
        )
    check_against_data(params, bundle.splits.train.num_classes, retrieval_size(bundle.splits))
    trainer = Trainer.create(params, bundle.splits.train.num_classes, device)
    result = FitResult(trainer)
    if evaluate_untrained:
        result.evaluations.append((0, evaluate_bundle(trainer, bundle, final=False)))
    division: Division | None = None
    for step in steps_from_params(params):
        segment = step.segment
        new_division = division_for_step(trainer, bundle, step, division)
        if step.division == "new":
            result.divisions.append((segment.start_epoch, new_division))
        if step.division != "all":
            division = new_division
        for stats in trainer.train_segment(segment, bundle.train, bundle.splits.train.labels, new_division):
            result.epochs.append(stats)
            on_epoch(stats)
        if step.evaluate:
            metrics = evaluate_bundle(trainer, bundle, final=segment.end_epoch == params.train.epochs)
            result.evaluations.append((segment.end_epoch, metrics))
    return result
