"""Optimiser construction and one training epoch over learner-tagged batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dcml.config import TrainConfig
from dcml.data.samplers import ClassBalancedBatchSampler, interleave_round_robin
from dcml.distributed import SINGLE, Shard, average_gradients, gather_batch, global_labels
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
    mask_penalty: float = 0.0  # mean decorrelation penalty per batch (model.learners: masks), in the loss

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


Progress = Callable[[Iterable, int], Iterable]  # (iterable, total) -> iterable, e.g. tqdm
Batch = tuple[int | None, list[int]]  # (learner or None for the full embedding, indices)


def build_optimizer(model: nn.Module, loss: nn.Module, config: TrainConfig, beta_lr: float) -> torch.optim.Adam:
    """Adam with backbone / embedding groups (masks, and β when the loss has parameters)."""
    groups = model.parameter_groups()
    param_groups = [
        {"name": "backbone", "params": groups["backbone"], "lr": config.lr_backbone},
        {"name": "embedding", "params": groups["embedding"], "lr": config.lr_embedding},
    ]
    if "masks" in groups:  # TPAMI'21 learner masks: own learning rate and weight decay
        group = {"name": "masks", "params": groups["masks"], "lr": config.lr_masks}
        param_groups.append({**group, "weight_decay": config.mask_weight_decay})
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


class EpochBatchSampler:
    """``batch_sampler`` of a segment's training DataLoader: the current epoch's batches.

    Built once per segment so the loader's workers persist across its epochs;
    :meth:`set_epoch` installs the next epoch's batches. Each index is paired with the
    seed of its image's random transforms (see ``ImageDataset.__getitem__``): the
    augmentation of an image is a function of (epoch seed, step, position) alone, the
    same with 0 or 16 workers and whatever order they finish in.

    Under data parallelism (``shard``) it yields this rank's part of each batch
    (:class:`~dcml.distributed.Shard`); positions stay those of the global batch, so
    augmentations do not change.
    """

    def __init__(self, shard: Shard = SINGLE) -> None:
        self.batches: Sequence[Batch] = []
        self.seed = 0
        self.shard = shard

    def set_epoch(self, batches: Sequence[Batch], seed: int) -> None:
        self.batches, self.seed = batches, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step, (_, indices) in enumerate(self.batches):
            yield [(int(indices[p]), item_seed(self.seed, step, p)) for p in self.shard.positions(len(indices))]


def item_seed(epoch_seed: int, step: int, position: int) -> int:
    """Seed of the random transforms of the image at ``position`` of batch ``step``."""
    return ((epoch_seed * 1_000_003 + step) * 1_000_003 + position) % 2**63


def train_loader(dataset: Dataset, sampler: EpochBatchSampler, *, num_workers: int, device: torch.device) -> DataLoader:
    """Workers persist across epochs, batches are prefetched and, on CUDA, pinned (by the
    loader's pinning thread, not the training loop) for asynchronous copies."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # the loader draws its workers' base seed from this generator instead of torch's
        # global one, which dropout uses: with 0 workers it would draw at every epoch,
        # with persistent workers only once, and the runs would differ
        generator=torch.Generator().manual_seed(0),
    )


# A non-finite loss is looked for every this many steps (one host sync each) and at the
# end of the epoch, instead of a sync per step; a NaN then stops the epoch before any
# checkpoint is written.
FINITE_CHECK_EVERY = 50


def train_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    batches: Sequence[Batch],
    *,
    epoch: int,
    num_learners: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    progress: Progress = lambda iterable, total: iterable,
    shard: Shard = SINGLE,
    dataset_labels: np.ndarray | None = None,
) -> EpochStats:
    """One pass over ``batches``; ``loader`` yields their ``(images, labels, indices)``
    in order (see :func:`train_loader`).

    Data-parallel (``shard.world > 1``, ``model`` in DDP, see :mod:`dcml.distributed`):
    the loader yields this rank's shard of each batch, the loss sees the gathered global
    batch (labels from ``dataset_labels``); the statistics are the global batch's.
    """
    model.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total_loss = torch.zeros((), device=device, dtype=torch.float64)  # summed on the device: no sync per step
    total_penalty = torch.zeros((), device=device, dtype=torch.float64)
    core = getattr(model, "module", model)  # the Embedder, also inside DDP
    masks = getattr(core, "masks", None)
    penalty_weight = core.config.mask_decorrelation if masks is not None else 0.0
    distributed = shard.world > 1
    if distributed and dataset_labels is None:
        raise ValueError("data-parallel training needs dataset_labels (the global batches' labels)")
    loss_parameters = [p for p in loss_fn.parameters() if p.requires_grad]
    num_images, checked, start = 0, 0, time.perf_counter()
    for step, ((learner, indices), (images, labels, _)) in enumerate(
        progress(zip(batches, loader, strict=True), len(batches))
    ):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with autocast:
            embeddings = model(images, num_learners=num_learners, learner=learner)
        if distributed:  # the loss sees the whole global batch, in its single-process order
            embeddings = gather_batch(embeddings, shard, len(indices))
            labels = global_labels(dataset_labels, indices)
        # labels stay on the CPU: the loss derives the batch's pair structure there, so
        # nothing in the step waits for the GPU (dcml.losses.sampling)
        # at least float32 (bf16 autocast outputs are upcast; float64 stays)
        loss = loss_fn(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), labels, generator=generator)
        objective = loss
        if penalty_weight > 0 and learner is not None:
            penalty = masks.penalty(num_learners)
            total_penalty += penalty.detach()
            objective = loss + penalty_weight * penalty
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if distributed:
            average_gradients(loss_parameters, shard.world)
        optimizer.step()
        total_loss += loss.detach() * labels.shape[0]
        num_images += labels.shape[0]
        if (step + 1) % FINITE_CHECK_EVERY == 0:
            _check_finite(total_loss, epoch, checked, step)
            checked = step + 1
    _check_finite(total_loss, epoch, checked, len(batches) - 1)
    seconds = time.perf_counter() - start
    return EpochStats(
        epoch=epoch,
        loss=float(total_loss) / max(num_images, 1),
        num_batches=len(batches),
        num_images=num_images,
        seconds=seconds,
        images_per_second=num_images / seconds if seconds > 0 else 0.0,
        mask_penalty=float(total_penalty) / max(len(batches), 1),
    )


def _check_finite(total_loss: torch.Tensor, epoch: int, first: int, last: int) -> None:
    if not torch.isfinite(total_loss):
        raise NonFiniteLossError(
            f"loss became {float(total_loss)} at epoch {epoch}, between batches {first} and {last}; "
            "lower the learning rate"
        )
