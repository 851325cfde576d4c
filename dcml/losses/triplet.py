"""Triplet loss with semi-hard negative mining (Schroff et al. 2015, FaceNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcml.losses.sampling import Triplets, pairwise_distances, positive_pairs, to_device, triplet_distances


@torch.no_grad()
def semi_hard_negatives(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> Triplets:
    """For every ordered positive pair (a, p) pick one negative n.

    Semi-hard: d_ap < d_an < d_ap + margin; the nearest such negative is taken. If there
    is none, the hardest (nearest) negative of the anchor. Pairs whose anchor has no
    negative are dropped. embeddings (B, D), labels (B,) -> int64 (T,) x 3.
    """
    device = embeddings.device
    anchors, positives, negatives = positive_pairs(labels)  # where the labels live (CPU: no sync)
    keep = negatives.any(1)[anchors]
    anchors, positives = to_device(anchors[keep], device), to_device(positives[keep], device)
    negatives = to_device(negatives, device)
    distances = pairwise_distances(embeddings.detach().float())
    d_ap = distances[anchors, positives][:, None]
    d_an = distances[anchors].masked_fill(~negatives[anchors], float("inf"))  # (T, B)
    semi_hard = (d_an > d_ap) & (d_an < d_ap + margin)
    nearest_semi_hard = d_an.masked_fill(~semi_hard, float("inf")).argmin(1)
    hardest = d_an.argmin(1)
    return anchors, positives, torch.where(semi_hard.any(1), nearest_semi_hard, hardest)


class TripletLoss(nn.Module):
    """mean over mined triplets of relu(d_ap - d_an + margin); 0 if there is no triplet."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """embeddings (B, D), labels (B,) -> scalar. ``generator`` is unused (deterministic mining)."""
        embeddings = embeddings.float()  # distances in fp32 also under bf16 autocast
        anchors, positives, negatives = semi_hard_negatives(embeddings, labels, self.margin)
        if len(anchors) == 0:
            return 0.0 * embeddings.sum()
        d_ap = triplet_distances(embeddings, anchors, positives)
        d_an = triplet_distances(embeddings, anchors, negatives)
        return F.relu(d_ap - d_an + self.margin).mean()
