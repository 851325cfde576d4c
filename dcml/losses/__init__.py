"""Metric-learning losses: margin loss with distance-weighted sampling, semi-hard triplet."""

from dcml.losses.margin import MarginLoss, margin_terms
from dcml.losses.registry import LOSSES, build_loss, register_loss
from dcml.losses.sampling import (
    SAMPLERS,
    distance_weighted_negatives,
    distance_weights,
    nearest_beyond_cutoff_negatives,
    pairwise_distances,
    triplet_distances,
)
from dcml.losses.triplet import TripletLoss, semi_hard_negatives

__all__ = [
    "LOSSES",
    "SAMPLERS",
    "MarginLoss",
    "TripletLoss",
    "build_loss",
    "distance_weighted_negatives",
    "distance_weights",
    "margin_terms",
    "nearest_beyond_cutoff_negatives",
    "pairwise_distances",
    "register_loss",
    "semi_hard_negatives",
    "triplet_distances",
]
