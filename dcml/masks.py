"""Learnable learner masks (TPAMI'21, "Improving Deep Metric Learning by Divide and Conquer").

Instead of owning a fixed slice of the embedding, learner ``k`` owns a mask ``m_k`` over
all ``d`` dims and embeds as ``normalize(emb * relu(m_k))``. A decorrelation penalty,
``lambda * mean_{k != l} cos(relu(m_k), relu(m_l))``, keeps the learners' masks apart.
The masks form their own optimiser group; once the learners stop (full-embedding and
fine-tuning epochs) they receive no gradient and stay fixed.

Hierarchical division: ``c`` clusters are active at a time (1, 2, 4, .. K). Cluster ``j``
of ``c`` uses row ``j * K / c`` of the (K, d) parameter, so when the clusters double,
child ``2j`` keeps its parent's row and child ``2j + 1`` starts as a copy of it (with the
parent's Adam moments); the two then diverge on their different data.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class LearnerMasks(nn.Module):
    def __init__(
        self, num_learners: int, dim: int, *, init: Literal["ones", "slices"] = "ones", hierarchical: bool = False
    ) -> None:
        super().__init__()
        if num_learners < 1 or (hierarchical and num_learners & (num_learners - 1)):
            raise ValueError(f"hierarchical masks need a power-of-two number of learners, got {num_learners}")
        weight = torch.ones(num_learners, dim)
        if init == "slices":
            if dim % num_learners or hierarchical:
                raise ValueError("mask_init 'slices' needs d divisible by K and no hierarchical division")
            size = dim // num_learners
            weight.zero_()
            for k in range(num_learners):
                weight[k, k * size : (k + 1) * size] = 1.0
        elif init != "ones":
            raise ValueError(f"unknown mask init {init!r}")
        self.weight = nn.Parameter(weight)
        # number of active masks, a Python int (reading a GPU tensor would sync every step);
        # saved in checkpoints as extra state, so a resumed run knows what was split
        self.level = 1 if hierarchical else num_learners

    def get_extra_state(self) -> dict[str, int]:
        return {"level": self.level}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.level = int(state["level"])

    @property
    def num_learners(self) -> int:
        return self.weight.shape[0]

    def row(self, num_clusters: int, cluster: int) -> int:
        """Row of the (K, d) parameter used by ``cluster`` of ``num_clusters`` active clusters."""
        if num_clusters < 1 or self.num_learners % num_clusters or not 0 <= cluster < num_clusters:
            raise ValueError(f"cluster {cluster} of {num_clusters} does not map onto {self.num_learners} masks")
        if num_clusters > self.level:
            raise ValueError(f"{num_clusters} clusters but only {self.level} masks are active (grow first)")
        return cluster * (self.num_learners // num_clusters)

    def apply(self, raw: torch.Tensor, num_clusters: int, cluster: int) -> torch.Tensor:
        """``raw * relu(m)`` for ``cluster`` (the caller normalises)."""
        return raw * F.relu(self.weight[self.row(num_clusters, cluster)])

    def active(self, num_clusters: int) -> torch.Tensor:
        """(c, d) relu'd masks of the ``num_clusters`` active clusters (rows 0, K/c, 2K/c, ...)."""
        stride = self.row(num_clusters, 1) if num_clusters > 1 else self.num_learners
        self.row(num_clusters, num_clusters - 1)  # checks the level
        return F.relu(self.weight[::stride])

    def penalty(self, num_clusters: int) -> torch.Tensor:
        """Mean pairwise cosine similarity of the active relu'd masks (0 with one mask)."""
        if num_clusters < 2:
            return self.weight.new_zeros(())
        masks = F.normalize(self.active(num_clusters), dim=1, eps=1e-8)
        cosine = masks @ masks.T
        off_diagonal = ~torch.eye(num_clusters, dtype=torch.bool, device=cosine.device)
        return cosine[off_diagonal].mean()

    @torch.no_grad()
    def grow(
        self, num_clusters: int, optimizer: torch.optim.Optimizer | None = None, *, reset_state: bool = False
    ) -> None:
        """Double the active masks until ``num_clusters`` are active; each new child copies
        its parent's mask and, when ``optimizer`` holds state for the masks, its moments —
        or, with ``reset_state`` (the authors' code: new mask parameters at every split),
        the masks' optimiser state is dropped and restarts at step 0."""
        if num_clusters > self.num_learners or self.num_learners % num_clusters:
            raise ValueError(f"cannot grow {self.num_learners} masks to {num_clusters} clusters")
        state = optimizer.state.get(self.weight, {}) if optimizer is not None else {}
        while self.level < num_clusters:
            level = self.level
            stride = self.num_learners // (2 * level)
            for parent in range(level):
                source = parent * 2 * stride  # == self.row(level, parent)
                target = source + stride  # == row of child 2 * parent + 1 at 2 * level
                self.weight[target] = self.weight[source]
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == self.weight.shape:
                        value[target] = value[source]
            self.level = 2 * level
            if reset_state and optimizer is not None:
                optimizer.state.pop(self.weight, None)  # Adam re-creates it, empty, at the next step
