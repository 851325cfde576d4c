"""The stateful edge of the method: model + loss + optimiser, built once, checkpointed.

:class:`Trainer` is what a driver (``dcml.fit`` in-process, or the Prefect tasks across
processes) holds. It trains one :class:`~dcml.schedule.Segment` at a time, embeds
datasets, and saves/restores itself, so each step can run in a fresh process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dcml.checkpoint import load_checkpoint, restore_rng_states, save_checkpoint
from dcml.config import Params, params_from_dict, to_dict
from dcml.division import Division
from dcml.embed import embed_dataset
from dcml.losses import build_loss
from dcml.model import Embedder
from dcml.schedule import Segment
from dcml.train import EpochStats, Progress, build_optimizer, epoch_batches, set_epoch_lr, train_epoch


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``: resuming at any epoch reproduces an uninterrupted run."""
    return (seed * 100_003 + epoch) % (2**31)


@dataclass
class Trainer:
    params: Params
    model: Embedder
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    num_train_classes: int
    epochs_done: int = 0

    @classmethod
    def create(
        cls, params: Params, num_train_classes: int, device: torch.device, *, load_pretrained: bool = True
    ) -> Trainer:
        """Fresh model (weights initialised from ``params.seed``), loss and optimiser."""
        torch.manual_seed(params.seed)  # parameter init draws from torch's generator
        model_config = params.model if load_pretrained else replace(params.model, pretrained="none")
        model = Embedder(model_config, num_learners_init=params.cluster.num_learners).to(device)
        if params.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss = build_loss(params.loss, num_train_classes).to(device)
        optimizer = build_optimizer(model, loss, params.train, params.loss.beta_lr)
        return cls(params, model, loss, optimizer, device, num_train_classes)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device) -> Trainer:
        state = load_checkpoint(path, map_location=device)
        params = params_from_dict(state["config"])
        trainer = cls.create(params, state["extra"]["num_train_classes"], device, load_pretrained=False)
        trainer.model.load_state_dict(state["model"])
        trainer.loss.load_state_dict(state["loss"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"])
        trainer.epochs_done = state["epoch"]
        return trainer

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            loss=self.loss,
            epoch=self.epochs_done,
            config=to_dict(self.params),
            extra={"num_train_classes": self.num_train_classes},
        )

    def train_segment(
        self,
        segment: Segment,
        dataset: Dataset,
        labels: np.ndarray,
        division: Division,
        *,
        progress: Progress = lambda iterable, total: iterable,
    ) -> list[EpochStats]:
        """Train epochs ``segment.start_epoch .. end_epoch-1`` on ``division``'s batches."""
        if self.epochs_done != segment.start_epoch:
            raise RuntimeError(f"trainer is at epoch {self.epochs_done}, segment starts at {segment.start_epoch}")
        t = self.params.train
        stats = []
        for epoch in range(segment.start_epoch, segment.end_epoch):
            seed = epoch_seed(self.params.seed, epoch)
            # torchvision's random transforms draw from torch's global generator; negative
            # sampling gets a generator of its own, seeded differently.
            torch.manual_seed(seed)
            generator = torch.Generator(device=self.device).manual_seed(seed + 1)
            set_epoch_lr(self.optimizer, epoch, t.lr_decay_gamma)
            batches = epoch_batches(
                division,
                labels,
                per_learner=segment.mode == "divide",
                batch_size=t.batch_size,
                images_per_class=t.images_per_class,
                seed=self.params.seed,
                epoch=epoch,
            )
            stats.append(
                train_epoch(
                    self.model,
                    self.loss,
                    self.optimizer,
                    dataset,
                    batches,
                    epoch=epoch,
                    num_learners=segment.num_learners,
                    device=self.device,
                    generator=generator,
                    bf16=t.bf16,
                    channels_last=t.channels_last,
                    num_workers=self.params.data.num_workers,
                    progress=progress,
                )
            )
            self.epochs_done = epoch + 1
        return stats

    def embed(
        self,
        dataset: Dataset,
        *,
        num_learners: int = 1,
        features: bool = False,
        progress: Progress = lambda iterable, total: iterable,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return embed_dataset(
            self.model,
            dataset,
            device=self.device,
            num_learners=num_learners,
            features=features,
            batch_size=self.params.eval.batch_size,
            num_workers=self.params.data.num_workers,
            bf16=False,  # embeddings for clustering and evaluation stay in float32
            channels_last=self.params.train.channels_last,
            progress=progress,
        )
