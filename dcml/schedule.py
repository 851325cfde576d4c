"""The training schedule as a pure function of the parameters.

Epochs ``[0, divide_until_epoch)``: *divide* — K learners, each trained on its cluster's
slice of the embedding, re-clustering every ``recluster_every`` epochs.
Epochs ``[divide_until_epoch, finetune_from_epoch)``: *clustered_full* — batches still come
from the clusters (and re-clustering continues), but the loss uses the full embedding.
Epochs ``[finetune_from_epoch, epochs)``: *finetune* — K=1 on all data (the conquer step).

The authors' code (200 epochs, full-embedding loss from epoch 80, K=1 from 190) is
``divide_until_epoch=80, finetune_from_epoch=190``; the paper's reading is 190/190.
K=1 is the plain baseline: every epoch is a *finetune* epoch, nothing is clustered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["divide", "clustered_full", "finetune"]


@dataclass(frozen=True)
class Segment:
    """Epochs ``[start_epoch, end_epoch)`` trained in one mode without re-clustering.

    ``recluster`` says whether a new division is computed before the segment starts;
    ``num_clusters`` is the K of the division the batches come from (1 = all data).
    """

    start_epoch: int
    end_epoch: int
    mode: Mode
    recluster: bool
    num_clusters: int
    division_index: int = -1  # the division its batches come from (-1: all data, finetune)

    @property
    def num_learners(self) -> int:
        """Slices the loss is computed on: K while dividing, else the full embedding."""
        return self.num_clusters if self.mode == "divide" else 1

    @property
    def name(self) -> str:
        return f"epochs-{self.start_epoch}-{self.end_epoch - 1}"


def mode_of_epoch(epoch: int, num_learners: int, divide_until_epoch: int, finetune_from_epoch: int) -> Mode:
    if num_learners == 1 or epoch >= finetune_from_epoch:
        return "finetune"
    return "divide" if epoch < divide_until_epoch else "clustered_full"


def plan(
    epochs: int,
    num_learners: int,
    recluster_every: int,
    divide_until_epoch: int,
    finetune_from_epoch: int,
    evaluate_every: int | None = None,
    hierarchical: bool = False,
) -> list[Segment]:
    """Split ``range(epochs)`` into segments at every re-clustering and mode boundary,
    and every ``evaluate_every`` epochs (where :func:`steps` evaluates).

    Without ``evaluate_every``, finetune epochs are cut every ``recluster_every`` epochs,
    so evaluation and checkpoints have the same cadence for every K (K=1 included).
    ``hierarchical`` (TPAMI'21): the i-th division has ``min(2**i, K)`` clusters — all data
    in one, then each cluster split in two at every re-clustering until K are reached.
    """
    if not 0 <= divide_until_epoch <= finetune_from_epoch <= epochs:
        raise ValueError("need 0 <= divide_until_epoch <= finetune_from_epoch <= epochs")
    if recluster_every < 1 or num_learners < 1 or (evaluate_every is not None and evaluate_every < 1):
        raise ValueError("recluster_every, num_learners and evaluate_every must be >= 1")
    segments: list[Segment] = []
    start, divisions, clusters = 0, 0, num_learners
    while start < epochs:
        mode = mode_of_epoch(start, num_learners, divide_until_epoch, finetune_from_epoch)
        end = min(epochs, (start // recluster_every + 1) * recluster_every)
        if evaluate_every is not None:
            end = min(end, (start // evaluate_every + 1) * evaluate_every)
        for boundary in (divide_until_epoch, finetune_from_epoch):
            if start < boundary < end:
                end = boundary
        clustered = mode != "finetune"
        recluster = clustered and (start % recluster_every == 0 or divisions == 0)
        if recluster:
            clusters = min(2**divisions, num_learners) if hierarchical else num_learners
            divisions += 1
        segments.append(
            Segment(
                start_epoch=start,
                end_epoch=end,
                mode=mode,
                recluster=recluster,
                num_clusters=clusters if clustered else 1,
                division_index=divisions - 1 if clustered else -1,
            )
        )
        start = end
    return segments


def plan_from_params(params) -> list[Segment]:  # noqa: ANN001 - dcml.config.Params
    """:func:`plan` with the values of a :class:`dcml.config.Params`."""
    c = params.cluster
    return plan(
        params.train.epochs,
        c.num_learners,
        c.recluster_every,
        c.divide_until_epoch,
        c.finetune_from_epoch,
        evaluate_every=params.eval.every_epochs,
        hierarchical=c.hierarchical,
    )


DivisionSource = Literal["new", "previous", "all"]


@dataclass(frozen=True)
class Step:
    """A segment with what surrounds it — the one place that decides, for every driver
    (``dcml.fit`` and the Prefect flow), where a segment's batches come from and whether
    the test split is evaluated after it.

    ``division``: ``new`` — cluster the training embeddings before the segment (the
    ``division_index``-th division, which seeds k-means); ``previous`` — keep the last
    division; ``all`` — all training data as one group (finetune).
    """

    segment: Segment
    division: DivisionSource
    division_index: int  # index of the division the segment trains on; -1 with "all"
    evaluate: bool
    # ``new``: how many separately normalised slices the training embedding clustered for
    # this division has — those the model was trained with until then (the previous
    # segment's learners; the first segment's own before any training). Hierarchical
    # slices: the c slices of the segment before the split, not the 2c after it.
    cluster_slices: int = 1


def evaluates_at(epoch: int, epochs: int, every: int) -> bool:
    """Test evaluation after ``epoch`` epochs: every ``every`` epochs, the untrained model
    (epoch 0) and the final epoch."""
    return epoch % every == 0 or epoch == epochs


def steps(segments: list[Segment], epochs: int, evaluate_every: int) -> list[Step]:
    """The segments of :func:`plan` annotated with their division source and evaluation."""
    out: list[Step] = []
    for position, segment in enumerate(segments):
        source = "all" if segment.mode == "finetune" else "new" if segment.recluster else "previous"
        evaluate = evaluates_at(segment.end_epoch, epochs, evaluate_every)
        trained_with = segments[position - 1].num_learners if position else segment.num_learners
        out.append(Step(segment, source, segment.division_index, evaluate, trained_with))
    return out


def steps_from_params(params) -> list[Step]:  # noqa: ANN001 - dcml.config.Params
    """:func:`steps` of :func:`plan_from_params`."""
    return steps(plan_from_params(params), params.train.epochs, params.eval.every_epochs)
