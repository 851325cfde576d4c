"""Triplet samplers for the margin loss: distance-weighted sampling and the authors' variant.

A sampler maps ``(embeddings (B, D), labels (B,), generator, cutoff, nonzero_loss_cutoff)``
to ``(anchor_idx, positive_idx, negative_idx)``, three int64 tensors of equal length T.
Every ordered positive pair ``(a, p)`` (a != p, same label) is one triplet, so an anchor
gets exactly as many negatives as it has positives. Anchors without any negative in the
batch (single-class batch) produce no triplets.

Host syncs: everything whose *size* depends on the labels (pairs, counts, which anchors
draw with replacement) is computed where the labels live. The training loop passes the
batch's labels on the CPU, so on a GPU the samplers only launch kernels and copy small
index tensors from pinned memory — no device-to-host synchronisation per step. Returned
indices live on the embeddings' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Sampler = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None", float, float], Triplets]


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances, clamped at 0 before the square root."""
    squared = embeddings.pow(2).sum(1)
    gram = embeddings @ embeddings.T
    return (squared[:, None] + squared[None, :] - 2 * gram).clamp(min=0).sqrt()


def triplet_distances(
    embeddings: torch.Tensor, anchors: torch.Tensor, others: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """(T,) Euclidean distances embeddings[anchors] - embeddings[others]; eps keeps sqrt differentiable."""
    return ((embeddings[anchors] - embeddings[others]).pow(2).sum(1) + eps).sqrt()


def to_device(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without waiting for the device (pinned source)."""
    if indices.device == device:
        return indices
    if device.type == "cuda" and indices.device.type == "cpu":
        return indices.pin_memory().to(device, non_blocking=True)
    return indices.to(device)


def positive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels (B,) -> (anchor_idx, positive_idx) of ordered same-label pairs sorted by anchor,
    and the (B, B) bool mask of negatives (different labels)."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    anchors, positives = (same & ~eye).nonzero(as_tuple=True)
    return anchors, positives, ~same


FAR_WEIGHT = 1e-6  # "~0": a far negative is drawn only when no closer one is left


def distance_weight_logits(distances: torch.Tensor, dim: int, cutoff: float) -> torch.Tensor:
    """log q(d)^-1 of Wu et al. 2017 for points on the unit sphere in R^dim.

    log q^-1(d) = -[(dim - 2) log d + ((dim - 3) / 2) log(1 - d^2 / 4)], with d clamped to
    [cutoff, 1.99] and 1 - d^2/4 clamped at 1e-8 so every value is finite.
    """
    d = distances.clamp(min=cutoff, max=1.99)
    return -((dim - 2) * d.log() + ((dim - 3) / 2) * (1 - d.pow(2) / 4).clamp(min=1e-8).log())


def distance_weights(
    distances: torch.Tensor, negatives: torch.Tensor, dim: int, cutoff: float, nonzero_loss_cutoff: float
) -> torch.Tensor:
    """(B, B) float64 unnormalised sampling weights of negatives, finite for any ``dim``.

    Log-weights are stabilised per anchor row (row max over valid negatives subtracted).
    Valid = different class and ``d < nonzero_loss_cutoff``. A row whose negatives all lie
    at or beyond ``nonzero_loss_cutoff`` falls back to uniform weights over its negatives,
    so that anchor still gets negatives. Same-class entries always weigh 0, every negative
    weighs at least the smallest positive float64 (so the number of candidates of an anchor
    is its number of negatives, known from the labels alone).

    Negatives at or beyond ``nonzero_loss_cutoff`` keep a tiny weight (``FAR_WEIGHT``
    times the row's smallest valid weight): without replacement they are drawn only once
    an anchor has run out of closer negatives, instead of repeating the close ones.
    """
    valid = negatives & (distances < nonzero_loss_cutoff)
    # float64: in high dim the log-weights within a row span hundreds of nats
    logits = distance_weight_logits(distances.double(), dim, cutoff).masked_fill(~valid, float("-inf"))
    row_max = logits.max(dim=1, keepdim=True).values
    row_max = torch.where(valid.any(1, keepdim=True), row_max, torch.zeros_like(row_max))
    weights = (logits - row_max).exp()
    smallest = weights.masked_fill(~valid, float("inf")).min(dim=1, keepdim=True).values
    weights = weights + torch.where(negatives & ~valid, FAR_WEIGHT * smallest, torch.zeros_like(weights))
    weights = torch.where(valid.any(1, keepdim=True), weights, negatives.to(weights.dtype))
    return torch.where(negatives, weights.clamp(min=torch.finfo(weights.dtype).tiny), torch.zeros_like(weights))


def draw_per_anchor(
    weights: torch.Tensor, counts: torch.Tensor, support: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``counts[a]`` columns from row ``a`` of ``weights`` (B, B) for each anchor.

    ``support[a]`` is the number of non-zero weights of row ``a`` (its negatives);
    ``counts`` and ``support`` may live on the CPU while ``weights`` is on the GPU.
    Without replacement when the row has at least ``counts[a]`` candidates, with
    replacement only otherwise. Rows without any candidate draw nothing.
    Returns (anchor_idx, negative_idx) on ``weights``' device, int64, sorted by anchor.
    """
    device = weights.device
    anchors_out, negatives_out = [], []
    eligible = (counts > 0) & (support > 0)
    for count in counts[eligible].unique().tolist():
        for replacement in (False, True):
            rows = (eligible & (counts == count) & ((support < count) == replacement)).nonzero().flatten()
            if len(rows):
                drawn = torch.multinomial(
                    weights[to_device(rows, device)], count, replacement=replacement, generator=generator
                )
                anchors_out.append(rows.repeat_interleave(count))
                negatives_out.append(drawn.flatten())
    if not anchors_out:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    anchor_idx = torch.cat(anchors_out)
    order = torch.sort(anchor_idx, stable=True).indices  # where the counts live: no sync
    return to_device(anchor_idx[order], device), torch.cat(negatives_out)[to_device(order, device)]


def _with_negatives(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive pairs (sorted by anchor) whose anchor has a negative, and the negatives mask."""
    anchors, positives, negatives = positive_pairs(labels)
    has_negative = negatives.any(1)[anchors]
    return anchors[has_negative], positives[has_negative], negatives


@torch.no_grad()
def distance_weighted_negatives(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> Triplets:
    """Distance-weighted sampling (Wu et al. 2017) with per-row stabilised weights.

    embeddings (B, D) unit-norm, labels (B,) int. For each anchor, as many negatives as
    it has positives are drawn from :func:`distance_weights` without replacement (with
    replacement only if the anchor has fewer candidate negatives than positives).
    ``generator`` must live on the embeddings' device. Returns int64 (T,) x 3.
    """
    device = embeddings.device
    anchors, positives, negatives = _with_negatives(labels)
    distances = pairwise_distances(embeddings.detach().float())
    negatives_on_device = to_device(negatives, device)
    weights = distance_weights(distances, negatives_on_device, embeddings.shape[1], cutoff, nonzero_loss_cutoff)
    counts = torch.bincount(anchors, minlength=len(labels))
    _, negative_idx = draw_per_anchor(weights, counts, negatives.sum(1), generator)
    return to_device(anchors, device), to_device(positives, device), negative_idx


@torch.no_grad()
def nearest_beyond_cutoff_negatives(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    cutoff: float = 0.5,
    nonzero_loss_cutoff: float = 1.4,
) -> Triplets:
    """The authors' CVPR'19 sampler: the nearest negatives at distance >= ``cutoff``.

    Deterministic (``generator`` and ``nonzero_loss_cutoff`` are unused; they are accepted
    for a common sampler signature). Each anchor takes as many negatives as it has
    positives (3 with 4 images per class); if fewer lie beyond ``cutoff``, the ones just
    below it fill up. An anchor with fewer negatives than positives reuses them cyclically.
    """
    device = embeddings.device
    anchors, positives, negatives = _with_negatives(labels)
    distances = pairwise_distances(embeddings.detach().float())
    # beyond the cutoff: rank by distance; below it: after all of those, nearest-to-cutoff first
    below_key = distances.max() + 1 + (cutoff - distances)
    rank_key = torch.where(distances >= cutoff, distances, below_key)
    rank_key = rank_key.masked_fill(~to_device(negatives, device), float("inf"))
    order = rank_key.argsort(dim=1)
    counts = torch.bincount(anchors, minlength=len(labels))
    num_negatives = negatives.sum(1)
    rows = ((counts > 0) & (num_negatives > 0)).nonzero().flatten()
    anchor_neg = rows.repeat_interleave(counts[rows])
    rank = _rank_within_anchor(counts[rows]) % num_negatives[anchor_neg]
    negative_idx = order[to_device(anchor_neg, device), to_device(rank, device)]
    return to_device(anchors, device), to_device(positives, device), negative_idx


def _rank_within_anchor(counts: torch.Tensor) -> torch.Tensor:
    """counts (R,) -> concatenation of arange(c) for each c, e.g. [2, 3] -> [0, 1, 0, 1, 2]."""
    starts = counts.cumsum(0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - starts.repeat_interleave(counts)


SAMPLERS: dict[str, Sampler] = {
    "distance_weighted": distance_weighted_negatives,
    "nearest_beyond_cutoff": nearest_beyond_cutoff_negatives,
}
