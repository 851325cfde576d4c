"""Loss registry: ``build_loss(config, num_classes)`` by ``LossConfig.name``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dcml.config import LossConfig
from dcml.losses.margin import MarginLoss
from dcml.losses.triplet import TripletLoss

LossBuilder = Callable[[LossConfig, int], nn.Module]


def build_margin_loss(config: LossConfig, num_classes: int) -> nn.Module:
    """Margin loss; ``num_classes`` sizes the per-class beta (training classes)."""
    return MarginLoss(
        margin=config.margin,
        beta=config.beta,
        beta_mode=config.beta_mode,
        num_classes=num_classes,
        nu=config.nu,
        sampler=config.negative_sampler,
        cutoff=config.cutoff,
        nonzero_loss_cutoff=config.nonzero_loss_cutoff,
    )


def build_triplet_loss(config: LossConfig, num_classes: int) -> nn.Module:
    """Semi-hard triplet loss with ``config.margin``."""
    return TripletLoss(margin=config.margin)


LOSSES: dict[str, LossBuilder] = {"margin": build_margin_loss, "triplet": build_triplet_loss}


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    """Decorator adding a ``(config, num_classes) -> nn.Module`` builder under ``name``."""

    def decorate(builder: LossBuilder) -> LossBuilder:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = builder
        return builder

    return decorate


def build_loss(config: LossConfig, num_classes: int) -> nn.Module:
    """The loss named ``config.name``; raises ``ValueError`` for an unknown name."""
    if config.name not in LOSSES:
        raise ValueError(f"unknown loss {config.name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[config.name](config, num_classes)
