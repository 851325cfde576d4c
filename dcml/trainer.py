"""The stateful edge of the method: model + loss + optimiser, built once, checkpointed.

:class:`Trainer` is what a driver (``dcml.fit`` in-process, or the Prefect tasks across
processes) holds. It trains one :class:`~dcml.schedule.Segment` at a time, embeds
datasets, and saves/restores itself, so each step can run in a fresh process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dcml.checkpoint import CheckpointError, load_checkpoint, restore_rng_states, save_checkpoint
from dcml.config import ConfigError, Params, params_from_stored, to_dict
from dcml.device import configure_backend, resolve_num_workers
from dcml.distributed import SINGLE, Shard, wrap
from dcml.division import Division
from dcml.embed import embed_dataset
from dcml.losses import build_loss
from dcml.model import Embedder
from dcml.schedule import Segment
from dcml.train import (
    EpochBatchSampler,
    EpochStats,
    Progress,
    build_optimizer,
    epoch_batches,
    set_epoch_lr,
    train_epoch,
    train_loader,
)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``: resuming at any epoch reproduces an uninterrupted run."""
    return (seed * 100_003 + epoch) % (2**31)


@dataclass
class Trainer:
    params: Params
    model: Embedder
    loss: nn.Module | None  # None: built for inference (embedding) only
    optimizer: torch.optim.Optimizer | None
    device: torch.device
    num_train_classes: int
    epochs_done: int = 0

    @classmethod
    def create(
        cls, params: Params, num_train_classes: int, device: torch.device, *, load_pretrained: bool = True
    ) -> Trainer:
        """Fresh model (weights initialised from ``params.seed``), loss and optimiser."""
        torch.manual_seed(params.seed)  # parameter init draws from torch's generator
        model = _build_model(params, device, load_pretrained=load_pretrained)
        loss = build_loss(params.loss, num_train_classes).to(device)
        optimizer = build_optimizer(model, loss, params.train, params.loss.beta_lr)
        return cls(params, model, loss, optimizer, device, num_train_classes)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device, *, params: Params | None = None) -> Trainer:
        """Resume training: model, loss, optimiser and RNG states as saved.

        The file is read onto the CPU; ``load_state_dict`` moves weights and Adam's
        moments to ``device`` and leaves Adam's ``step`` counters on the CPU, as a fresh
        optimiser has them (on the GPU each would cost a host sync per step).
        ``params``: the run's current params, where settings that do not change results
        (e.g. ``data.num_workers``) may differ from the checkpoint's; default: the stored ones.
        """
        state = load_checkpoint(path)
        params = params or _stored_params(state, path)
        trainer = cls.create(params, state["extra"]["num_train_classes"], device, load_pretrained=False)
        _load_weights(trainer.model, state, path)
        trainer.loss.load_state_dict(state["loss"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"], device)
        trainer.epochs_done = state["epoch"]
        return trainer

    @classmethod
    def for_inference(cls, path: str | Path, device: torch.device, *, params: Params | None = None) -> Trainer:
        """The model of a checkpoint, for embedding: the optimiser state is never read
        (the file is memory-mapped) and no loss or optimiser is built. ``params`` as in
        :meth:`from_checkpoint`."""
        state = load_checkpoint(path, model_only=True)
        params = params or _stored_params(state, path)
        model = _build_model(params, device, load_pretrained=False)
        _load_weights(model, state, path)
        num_classes = state["extra"]["num_train_classes"]
        return cls(params, model.eval(), None, None, device, num_classes, epochs_done=state["epoch"])

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            loss=self.loss,
            epoch=self.epochs_done,
            config=to_dict(self.params),
            device=self.device,
            extra={"num_train_classes": self.num_train_classes},
        )

    @property
    def num_workers(self) -> int:
        return resolve_num_workers(self.params.data.num_workers, self.device)

    def train_segment(
        self,
        segment: Segment,
        dataset: Dataset,
        labels: np.ndarray,
        division: Division,
        *,
        progress: Progress = lambda iterable, total: iterable,
        on_epoch: Callable[[EpochStats], None] = lambda stats: None,
        shard: Shard = SINGLE,
    ) -> list[EpochStats]:
        """Train epochs ``segment.start_epoch .. end_epoch-1`` on ``division``'s batches;
        ``on_epoch`` gets each epoch's statistics as soon as it ends.

        ``shard``: this process's rank among ``shard.world`` data-parallel processes
        (:mod:`dcml.distributed`; the process group must be initialised): every rank
        calls this with the same arguments and ends with the same weights."""
        if self.optimizer is None or self.loss is None:
            raise RuntimeError("this trainer was built for inference (Trainer.for_inference); it cannot train")
        if self.epochs_done != segment.start_epoch:
            raise RuntimeError(f"trainer is at epoch {self.epochs_done}, segment starts at {segment.start_epoch}")
        t = self.params.train
        if self.model.masks is not None and segment.mode == "divide":
            # hierarchical division: children start from their parent's mask (no-op otherwise)
            reset = self.params.model.mask_split_state == "reset"
            self.model.masks.grow(segment.num_clusters, self.optimizer, reset_state=reset)
        stats = []
        net = self.model
        if shard.world > 1:
            net = wrap(self.model, self.device, sync_batchnorm=not self.params.model.freeze_bn)
        # one loader for the segment: its workers persist across epochs, the sampler changes
        sampler = EpochBatchSampler(shard)
        workers = resolve_num_workers(self.params.data.num_workers, self.device, processes=shard.world)
        loader = train_loader(dataset, sampler, num_workers=workers, device=self.device)
        for epoch in range(segment.start_epoch, segment.end_epoch):
            seed = epoch_seed(self.params.seed, epoch)
            # dropout draws from torch's global generator (one stream per rank); each
            # image's random transforms from a seed of its own (EpochBatchSampler), so
            # results do not depend on the number of loader workers; negative sampling
            # has a generator of its own (the same on every rank).
            torch.manual_seed((seed + 7919 * shard.rank) % 2**31)
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
            sampler.set_epoch(batches, seed)
            stats.append(
                train_epoch(
                    net,
                    self.loss,
                    self.optimizer,
                    loader,
                    batches,
                    epoch=epoch,
                    num_learners=segment.num_learners,
                    device=self.device,
                    generator=generator,
                    bf16=t.bf16,
                    channels_last=t.channels_last,
                    progress=progress,
                    shard=shard,
                    dataset_labels=labels,
                )
            )
            self.epochs_done = epoch + 1
            on_epoch(stats[-1])
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
            num_workers=self.num_workers,
            bf16=False,  # embeddings for clustering and evaluation stay in float32
            channels_last=self.params.train.channels_last,
            progress=progress,
        )


def _stored_params(state: dict, path: str | Path) -> Params:
    """The params a checkpoint was trained with; :class:`CheckpointError` naming the file
    when they are not valid params of this code."""
    try:
        return params_from_stored(state["config"])
    except ConfigError as error:
        raise CheckpointError(f"{path}: its stored config is not valid dcml params ({error})") from None


def _load_weights(model: Embedder, state: dict, path: str | Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path}: its weights do not fit the model its config describes ({error})") from None


def _build_model(params: Params, device: torch.device, *, load_pretrained: bool) -> Embedder:
    """The run's model on ``device`` (backend switches applied, channels_last if asked)."""
    configure_backend(params.train, device)
    model_config = params.model if load_pretrained else replace(params.model, pretrained="none")
    model = Embedder(
        model_config, num_learners_init=params.cluster.num_learners, hierarchical=params.cluster.hierarchical
    ).to(device)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
