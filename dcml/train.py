"""Optimiser construction and one training epoch over learner-tagged batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dcml.config import TrainConfig
from dcml.data.samplers import ClassBalancedBatchSampler, interleave_round_robin
from dcml.division import Division


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    num_batches: int
    num_images: int
    seconds: float
    images_per_second: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


Progress = Callable[[Iterable, int], Iterable]  # (iterable, total) -> iterable, e.g. tqdm
Batch = tuple[int | None, list[int]]  # (learner or None for the full embedding, indices)


def build_optimizer(model: nn.Module, loss: nn.Module, config: TrainConfig, beta_lr: float) -> torch.optim.Adam:
    """Adam with backbone / embedding groups (and β when the loss has parameters)."""
    groups = model.parameter_groups()
    param_groups = [
        {"name": "backbone", "params": groups["backbone"], "lr": config.lr_backbone},
        {"name": "embedding", "params": groups["embedding"], "lr": config.lr_embedding},
    ]
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        param_groups.append({"name": "loss", "params": loss_params, "lr": beta_lr, "weight_decay": 0.0})
    for group in param_groups:
        group["base_lr"] = group["lr"]
    return torch.optim.Adam(param_groups, weight_decay=config.weight_decay)


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, gamma: float) -> None:
    """Exponential decay as a pure function of the epoch, so resuming needs no scheduler state."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * gamma**epoch


def epoch_batches(
    division: Division,
    labels: np.ndarray,
    *,
    per_learner: bool,
    batch_size: int,
    images_per_class: int,
    seed: int,
    epoch: int,
) -> list[Batch]:
    """Class-balanced batches of every cluster, interleaved round-robin.

    With ``per_learner`` each batch is tagged with its cluster (the learner whose slice
    the loss uses); otherwise with None (loss on the full embedding).
    """
    samplers = []
    for cluster in range(division.num_clusters):
        indices = np.flatnonzero((division.assignment == cluster) & division.keep)
        sampler = ClassBalancedBatchSampler(
            labels, indices, batch_size // images_per_class, images_per_class, seed=seed * 1009 + cluster
        )
        sampler.set_epoch(epoch)
        samplers.append(sampler)
    return [(learner if per_learner else None, batch) for learner, batch in interleave_round_robin(samplers)]


def train_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    batches: Sequence[Batch],
    *,
    epoch: int,
    num_learners: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    num_workers: int = 0,
    progress: Progress = lambda iterable, total: iterable,
) -> EpochStats:
    """One pass over ``batches``; the dataset yields ``(image, label, index)``."""
    model.train()
    loader = DataLoader(
        dataset,
        batch_sampler=[indices for _, indices in batches],
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total_loss, num_images, start = 0.0, 0, time.perf_counter()
    for step, ((learner, _), (images, labels, _)) in enumerate(
        progress(zip(batches, loader, strict=True), len(batches))
    ):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            embeddings = model(images, num_learners=num_learners, learner=learner)
        loss = loss_fn(embeddings.float(), labels, generator=generator)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch}, batch {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        num_images += len(labels)
    seconds = time.perf_counter() - start
    return EpochStats(
        epoch=epoch,
        loss=total_loss / max(num_images, 1),
        num_batches=len(batches),
        num_images=num_images,
        seconds=seconds,
        images_per_second=num_images / seconds if seconds > 0 else 0.0,
    )
