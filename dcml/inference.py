"""A checkpoint's test embedding as a plain module: ``images -> embedding``.

What is exported (the MLflow model) computes exactly the embedding the pipeline
evaluated for that checkpoint: the number of separately normalised slices is fixed from
the run's params and the checkpoint's epoch by :func:`dcml.evaluate.checkpoint_test_slices`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dcml.evaluate import checkpoint_test_slices
from dcml.model import Embedder
from dcml.trainer import Trainer


class TestEmbedder(nn.Module):
    """``forward(images (B, 3, H, W)) -> (B, d)``: ``model(images, num_learners=num_slices)``.

    ``num_slices`` is a plain int, fixed at construction, so the module exports
    (``torch.export``, MLflow's pt2 format) with one input.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, model: Embedder, num_slices: int) -> None:
        super().__init__()
        self.model = model
        self.num_slices = int(num_slices)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, num_learners=self.num_slices)

    @classmethod
    def from_trainer(cls, trainer: Trainer) -> TestEmbedder:
        """The test embedding of ``trainer``'s model after ``trainer.epochs_done`` epochs (eval mode)."""
        slices = checkpoint_test_slices(trainer.params, trainer.epochs_done)
        return cls(trainer.model, slices).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | None = None) -> TestEmbedder:
        """The test embedding of a checkpoint (its stored params), on ``device`` (default CPU)."""
        return cls.from_trainer(Trainer.for_inference(path, device or torch.device("cpu")))
