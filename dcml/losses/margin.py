"""Margin loss of Wu et al. 2017 ("Sampling Matters") with fixed or learnable beta."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dcml.losses.sampling import SAMPLERS, Sampler, to_device, triplet_distances

BetaMode = Literal["fixed", "global", "per_class"]


def margin_terms(
    d_ap: torch.Tensor, d_an: torch.Tensor, beta: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-triplet terms relu(d_ap - beta + margin) and relu(beta - d_an + margin), each (T,)."""
    return F.relu(d_ap - beta + margin), F.relu(beta - d_an + margin)


class MarginLoss(nn.Module):
    """Margin loss with a negative sampler (distance-weighted by default).

    loss = (sum of both terms over triplets + nu * sum of the betas used) / number of
    non-zero terms, exactly as Wu et al.'s reference code; the nu term only exists for a
    learnable beta. No triplet or no non-zero term -> 0 (still attached to the graph).

    ``beta_mode``: ``fixed`` (a buffer), ``global`` (one learnable scalar) or
    ``per_class`` (one learnable beta per class; the anchor's class picks it). For
    ``per_class`` the labels passed to :meth:`forward` must be the training split's
    global labels in ``[0, num_classes)``, not labels re-indexed per cluster or batch.
    A learnable beta is an ``nn.Parameter``: give ``loss.parameters()`` to the optimiser.
    """

    def __init__(
        self,
        margin: float = 0.2,
        beta: float = 1.2,
        beta_mode: BetaMode = "fixed",
        num_classes: int = 1,
        nu: float = 0.0,
        sampler: str | Sampler = "distance_weighted",
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
    ) -> None:
        super().__init__()
        self.margin, self.nu = margin, nu
        self.beta_mode = beta_mode
        self.cutoff, self.nonzero_loss_cutoff = cutoff, nonzero_loss_cutoff
        self.sampler = SAMPLERS[sampler] if isinstance(sampler, str) else sampler
        if beta_mode == "fixed":
            self.register_buffer("beta", torch.tensor(float(beta)))
        elif beta_mode == "global":
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        elif beta_mode == "per_class":
            self.beta = nn.Parameter(torch.full((num_classes,), float(beta)))
        else:
            raise ValueError(f"unknown beta_mode {beta_mode!r}; choose fixed, global or per_class")

    def beta_for(self, labels: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(T,) beta used for each triplet (the anchor's class beta for ``per_class``).

        ``labels`` (B,) may live on the CPU (the check below then costs no host sync),
        ``anchors`` (T,) on the embeddings' device.
        """
        if self.beta_mode != "per_class":
            return self.beta.expand(len(anchors))
        if len(labels) and int(labels.max()) >= len(self.beta):
            raise ValueError(
                f"label {int(labels.max())} >= num_classes ({len(self.beta)}); per-class "
                "beta needs the training split's global labels"
            )
        return self.beta[to_device(labels, self.beta.device)[anchors]]

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """embeddings (B, D) unit-norm, labels (B,) int64 -> scalar loss. ``labels`` may
        stay on the CPU (as the training loop passes them): see ``dcml.losses.sampling``."""
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.float()  # distances in fp32 under autocast; float64 stays float64
        anchors, positives, negatives = self.sampler(
            embeddings, labels, generator, self.cutoff, self.nonzero_loss_cutoff
        )
        beta = self.beta_for(labels, anchors)
        d_ap = triplet_distances(embeddings, anchors, positives)
        d_an = triplet_distances(embeddings, anchors, negatives)
        pos_loss, neg_loss = margin_terms(d_ap, d_an, beta, self.margin)
        total = pos_loss.sum() + neg_loss.sum()
        if self.beta_mode != "fixed":
            total = total + self.nu * beta.sum()
        num_active = (pos_loss > 0).sum() + (neg_loss > 0).sum()
        # 0 when nothing is active, without a host sync and with the graph kept
        scale = torch.where(num_active > 0, 1.0 / num_active.clamp(min=1), 0.0)
        return (total + 0.0 * embeddings.sum()) * scale
