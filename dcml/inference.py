"""A checkpoint's test embedding as a plain module: ``images -> embedding``.

What is exported (the MLflow model) computes exactly the embedding the pipeline
evaluated for that checkpoint: the number of separately normalised slices is fixed from
the run's params and the checkpoint's epoch by :func:`dcml.evaluate.checkpoint_test_slices`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcml.config import Params
from dcml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from dcml.evaluate import checkpoint_test_slices
from dcml.model import Embedder, learner_slice
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


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint ready to embed images as the pipeline evaluated it.

    ``embedder``: its test embedding (:class:`TestEmbedder`, eval mode); ``transform``:
    the run's evaluation transform (PIL RGB image -> tensor); ``params``: the run's params;
    ``digest``: SHA-256 of the checkpoint file (what identifies the model);
    ``batch_size``: ``eval.batch_size``, the batches the pipeline embedded in.
    """

    embedder: TestEmbedder
    transform: Callable
    params: Params
    epoch: int
    digest: str
    checkpoint: str

    @property
    def batch_size(self) -> int:
        return self.params.eval.batch_size

    @property
    def dimension(self) -> int:
        return self.params.model.embedding_dim

    def describe(self) -> dict[str, Any]:
        """What ``info.json`` files record about the model."""
        data = self.params.data
        return {
            "checkpoint": self.checkpoint,
            "checkpoint_absolute": str(Path(self.checkpoint).resolve()),
            "sha256": self.digest,
            "epoch": self.epoch,
            "backbone": self.params.model.backbone,
            "learners": self.params.model.learners,
            "num_learners": self.params.cluster.num_learners,
            "num_slices": self.embedder.num_slices,
            "dimension": self.dimension,
            "recall_ks": list(self.params.eval.recall_ks),
            "transform": {
                "resize": data.resize_size,
                "center_crop": data.image_size,
                "normalize_mean": list(IMAGENET_MEAN),
                "normalize_std": list(IMAGENET_STD),
            },
        }

    def subspaces(self) -> list[dict[str, Any]]:
        """Each learner's sub-space of the (normalised) test embedding, see :func:`learner_subspaces`."""
        return learner_subspaces(self.embedder.model, self.params)


def load_model(checkpoint: str | Path, device: torch.device | None = None) -> LoadedModel:
    """The checkpoint's test embedding and evaluation transform (see :class:`LoadedModel`)."""
    device = device or torch.device("cpu")
    trainer = Trainer.for_inference(checkpoint, device)
    data = trainer.params.data
    return LoadedModel(
        embedder=TestEmbedder.from_trainer(trainer),
        transform=eval_transform(data.image_size, data.resize_size),
        params=trainer.params,
        epoch=trainer.epochs_done,
        digest=file_digest(checkpoint),
        checkpoint=str(checkpoint),
    )


def file_digest(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def learner_subspaces(model: Embedder, params: Params) -> list[dict[str, Any]]:
    """Learner ``i``'s embedding from the normalised test embedding ``e`` of the same image.

    Slices (CVPR'19): ``{"kind": "slice", "start": a, "stop": b}`` — learner ``i`` is
    ``normalize(e[a:b])``, which equals ``model(x, num_learners=K, learner=i)`` whatever
    the number of normalised slices of ``e``. Masks (TPAMI'21): ``{"kind": "mask",
    "weights": relu(m_i)}`` — learner ``i`` is ``normalize(e * relu(m_i))``, equal to
    ``model(x, num_learners=K, learner=i)`` since ``e`` is ``normalize(raw)``.
    """
    k, dim = params.cluster.num_learners, params.model.embedding_dim
    if model.masks is not None:
        active = model.masks.level  # hierarchical: the clusters reached by the end of training
        weights = torch.relu(model.masks.weight.detach().float().cpu())
        return [
            {"kind": "mask", "weights": [float(w) for w in weights[model.masks.row(active, i)]]} for i in range(active)
        ]
    return [
        {"kind": "slice", "start": learner_slice(dim, k, i).start, "stop": learner_slice(dim, k, i).stop}
        for i in range(k)
    ]
