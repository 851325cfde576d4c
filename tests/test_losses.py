"""Tests for dcml.losses: distance-weighted sampling, margin loss, semi-hard triplet, registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dcml.config import LossConfig
from dcml.losses import (
    LOSSES,
    MarginLoss,
    TripletLoss,
    build_loss,
    distance_weighted_negatives,
    distance_weights,
    nearest_beyond_cutoff_negatives,
    pairwise_distances,
    register_loss,
    semi_hard_negatives,
)
from dcml.losses import registry as loss_registry


def balanced_batch(dim: int, classes: int = 20, per_class: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(classes * per_class, dim, generator=generator), dim=1)
    return embeddings, torch.arange(classes).repeat_interleave(per_class)


def negatives_by_anchor(anchors: torch.Tensor, negatives: torch.Tensor) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for a, n in zip(anchors.tolist(), negatives.tolist(), strict=True):
        out.setdefault(a, []).append(n)
    return out


# ---------------------------------------------------------------- distance-weighted sampling


@pytest.mark.parametrize("dim", [16, 128, 512])
def test_distance_weights_finite_and_zero_for_same_class(dim: int) -> None:
    embeddings, labels = balanced_batch(dim)
    # pull some points together so the rows contain close negatives too
    embeddings = F.normalize(embeddings + 2 * embeddings[:1], dim=1)
    negatives = labels[:, None] != labels[None, :]
    weights = distance_weights(pairwise_distances(embeddings), negatives, dim, 0.5, 1.4)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights[~negatives] == 0).all()
    assert (weights.sum(1) > 0).all()


@pytest.mark.parametrize("dim", [16, 128, 512])
def test_distance_weights_stabilised_per_anchor_row(dim: int) -> None:
    """Row 0's nearest negative is at 0.5, row 3's at 1.3: log-weights differ by ~360 nats at 512-d."""
    e0, e1, e2, e3 = torch.eye(dim)[:4]

    def towards(base: torch.Tensor, other: torch.Tensor, distance: float) -> torch.Tensor:
        angle = 2 * torch.asin(torch.tensor(distance / 2))
        return torch.cos(angle) * base + torch.sin(angle) * other

    p3 = towards(e0, e3, 1.3)
    points = [e0, towards(e0, e2, 0.05), towards(e0, e1, 0.5), p3, towards(p3, e2, 0.05)]
    embeddings, labels = torch.stack(points), torch.tensor([0, 0, 1, 2, 2])
    distances = pairwise_distances(embeddings)
    assert distances[0, 2].item() == pytest.approx(0.5, abs=1e-4)
    assert distances[3, :3].min().item() == pytest.approx(1.3, abs=1e-4)
    weights = distance_weights(distances, labels[:, None] != labels[None, :], dim, 0.5, 1.4)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.max(1).values, torch.ones(5, dtype=weights.dtype))
    anchors, _, negatives = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(0))
    assert anchors.tolist() == [0, 1, 3, 4] and (labels[anchors] != labels[negatives]).all()


@pytest.mark.parametrize("dim", [16, 128, 512])
def test_dws_indices_are_valid_triplets(dim: int) -> None:
    embeddings, labels = balanced_batch(dim)
    generator = torch.Generator().manual_seed(0)
    anchors, positives, negatives = distance_weighted_negatives(embeddings, labels, generator)
    assert anchors.dtype == positives.dtype == negatives.dtype == torch.long
    assert len(anchors) == 80 * 3  # every ordered positive pair, one negative each
    assert (labels[anchors] == labels[positives]).all() and (anchors != positives).all()
    assert (labels[anchors] != labels[negatives]).all()
    for anchor, drawn in negatives_by_anchor(anchors, negatives).items():
        assert len(drawn) == 3 and len(set(drawn)) == 3, f"anchor {anchor} repeats a negative"


def test_dws_count_per_anchor_equals_positives_for_unbalanced_classes() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3])
    embeddings = F.normalize(torch.randn(11, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    anchors, _, negatives = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(0))
    counts = torch.bincount(anchors, minlength=11)
    assert counts.tolist() == [1, 1, 2, 2, 2, 4, 4, 4, 4, 4, 0]
    assert (labels[anchors] != labels[negatives]).all()


def test_dws_with_replacement_only_when_too_few_negatives() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    embeddings = F.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    anchors, _, negatives = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(0))
    drawn = negatives_by_anchor(anchors, negatives)
    assert all(len(drawn[a]) == 3 and set(drawn[a]) <= {4, 5} for a in range(4))
    assert all(sorted(drawn[a]) in ([0], [1], [2], [3]) for a in (4, 5))


def test_dws_single_class_batch_gives_no_triplets() -> None:
    embeddings, _ = balanced_batch(16, classes=1)
    anchors, positives, negatives = distance_weighted_negatives(embeddings, torch.zeros(4, dtype=torch.long))
    assert len(anchors) == len(positives) == len(negatives) == 0
    assert MarginLoss()(embeddings.requires_grad_(), torch.zeros(4, dtype=torch.long)).item() == 0.0


def far_negative_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: 3 points near e0; class 1: 5 points at distance ~1 from them; point 8 antipodal."""
    e0, e1 = torch.eye(16)[0], torch.eye(16)[1]
    jitter = 0.05 * torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
    points = torch.stack([e0] * 3 + [F.normalize(e0 + 1.2 * e1, dim=0)] * 5 + [-e0]) + jitter
    return F.normalize(points, dim=1), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2])


def test_dws_never_samples_negative_beyond_nonzero_loss_cutoff_when_closer_exist() -> None:
    embeddings, labels = far_negative_batch()
    distances = pairwise_distances(embeddings)
    assert (distances[:3, 8] > 1.9).all() and (distances[:3, 3:8] < 1.4).all()
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        anchors, _, negatives = distance_weighted_negatives(embeddings, labels, generator)
        assert not ((anchors < 3) & (negatives == 8)).any()


def test_dws_falls_back_to_uniform_when_all_negatives_are_far() -> None:
    embeddings, labels = far_negative_batch()
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1])  # point 8 is the only negative, and far
    anchors, _, negatives = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(0))
    assert ((negatives == 8) == (anchors < 8)).all()
    assert (anchors < 8).sum() == 8 * 7


def test_dws_reproducible_with_generator() -> None:
    embeddings, labels = balanced_batch(128)
    first = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(5))
    second = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(5))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_nearest_beyond_cutoff_picks_nearest_negatives_past_cutoff() -> None:
    x = torch.tensor([[0.0], [0.1], [0.3], [0.7], [0.9], [1.5]])  # anchor 0, positive 1
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    anchors, positives, negatives = nearest_beyond_cutoff_negatives(x, labels, cutoff=0.5)
    row = (anchors == 0).nonzero().flatten()
    assert positives[row].tolist() == [1] and negatives[row].tolist() == [3]
    two_positives = torch.tensor([0, 0, 0, 1, 1, 1])  # anchor 0 needs 2 negatives: 0.7 then 0.9
    anchors, _, negatives = nearest_beyond_cutoff_negatives(x, two_positives, cutoff=0.5)
    assert negatives[anchors == 0].tolist() == [3, 4]


# ---------------------------------------------------------------- margin loss


def fixed_sampler(*_: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor([0, 2, 1, 3]), torch.tensor([1, 3, 0, 2]), torch.tensor([2, 1, 3, 0])


# points on a line: d_ap = 1.3, 1.8, 1.3, 1.8 and d_an = 0.8, 0.5, 1.3, 2.6 for the 4 triplets
LINE = torch.tensor([[0.0], [1.3], [0.8], [2.6]])
LINE_LABELS = torch.tensor([0, 0, 1, 1])


def test_margin_loss_hand_computed_fixed_beta() -> None:
    loss = MarginLoss(margin=0.2, beta=1.2, sampler=fixed_sampler)
    # terms: (0.3, 0.6), (0.8, 0.9), (0.3, 0.1), (0.8, 0) -> 3.8 over 7 non-zero terms
    assert loss(LINE, LINE_LABELS).item() == pytest.approx(3.8 / 7, abs=1e-6)


def test_margin_loss_hand_computed_per_class_beta_with_nu() -> None:
    loss = MarginLoss(margin=0.2, beta_mode="per_class", num_classes=2, nu=0.1, sampler=fixed_sampler)
    with torch.no_grad():
        loss.beta.copy_(torch.tensor([1.0, 1.5]))
    # betas used 1.0, 1.5, 1.0, 1.5; terms (0.5, 0.4), (0.5, 1.2), (0.5, 0), (0.5, 0) -> 3.6 over 6
    assert loss(LINE, LINE_LABELS).item() == pytest.approx((3.6 + 0.1 * 5.0) / 6, abs=1e-6)


def test_margin_loss_zero_when_no_active_term_and_graph_connected() -> None:
    embeddings = torch.tensor([[0.0], [0.1], [1.6], [1.7]], requires_grad=True)
    loss = MarginLoss(beta_mode="global", sampler=fixed_sampler)
    value = loss(torch.cat([embeddings[:2], embeddings[2:]]), LINE_LABELS)
    value.backward()
    assert value.item() == 0.0 and embeddings.grad is not None and (embeddings.grad == 0).all()


def test_per_class_beta_rejects_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MarginLoss(beta_mode="per_class", num_classes=1, sampler=fixed_sampler)(LINE, LINE_LABELS)


def test_fixed_beta_is_not_a_parameter() -> None:
    loss = MarginLoss(beta_mode="fixed")
    assert list(loss.parameters()) == [] and "beta" in dict(loss.named_buffers())


@pytest.mark.parametrize(("mode", "shape"), [("global", ()), ("per_class", (20,))])
def test_learnable_beta_is_optimised(mode: str, shape: tuple[int, ...]) -> None:
    loss = MarginLoss(beta_mode=mode, num_classes=20, nu=0.01)
    assert [p.shape for p in loss.parameters()] == [torch.Size(shape)]
    embeddings, labels = balanced_batch(16)
    embeddings.requires_grad_()
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.01)
    before = loss.beta.detach().clone()
    loss(embeddings, labels, torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    assert (loss.beta.detach() != before).all()
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("dim", [16, 128, 512])
def test_margin_loss_finite_gradients(dim: int) -> None:
    embeddings, labels = balanced_batch(dim)
    embeddings.requires_grad_()
    value = MarginLoss()(embeddings, labels, torch.Generator().manual_seed(0))
    value.backward()
    assert torch.isfinite(value) and value > 0 and torch.isfinite(embeddings.grad).all()


# ---------------------------------------------------------------- triplet loss


def test_semi_hard_picks_nearest_semi_hard_negative() -> None:
    x = torch.tensor([[0.0], [0.5], [0.3], [0.6], [0.65], [1.5]])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    anchors, positives, negatives = semi_hard_negatives(x, labels, margin=0.2)
    row = ((anchors == 0) & (positives == 1)).nonzero().flatten()
    assert negatives[row].tolist() == [3]


def test_semi_hard_falls_back_to_hardest_negative() -> None:
    x = torch.tensor([[0.0], [0.5], [1.5], [0.3]])
    labels = torch.tensor([0, 0, 1, 1])
    anchors, positives, negatives = semi_hard_negatives(x, labels, margin=0.2)
    row = ((anchors == 0) & (positives == 1)).nonzero().flatten()
    assert negatives[row].tolist() == [3]


def test_triplet_loss_hand_computed() -> None:
    x = torch.tensor([[0.0], [0.5], [0.6]])
    # (0, 1): semi-hard negative at 0.6 -> 0.1; (1, 0): none semi-hard, hardest at 0.1 -> 0.6
    value = TripletLoss(margin=0.2)(x, torch.tensor([0, 0, 1]))
    assert value.item() == pytest.approx(0.35, abs=1e-6)


# ---------------------------------------------------------------- registry


def test_build_loss_returns_configured_modules() -> None:
    config = LossConfig(beta_mode="per_class", negative_sampler="nearest_beyond_cutoff", margin=0.3)
    margin = build_loss(config, num_classes=7)
    assert isinstance(margin, MarginLoss) and margin.beta.shape == (7,) and margin.margin == 0.3
    assert margin.sampler is nearest_beyond_cutoff_negatives
    triplet = build_loss(dataclasses.replace(config, name="triplet"), num_classes=7)
    assert isinstance(triplet, TripletLoss) and triplet.margin == 0.3


def test_build_loss_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss(dataclasses.replace(LossConfig(), name="nope"), num_classes=2)  # type: ignore[arg-type]


def test_register_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_registry, "LOSSES", dict(LOSSES))

    @register_loss("custom")
    def build_custom(config: LossConfig, num_classes: int) -> torch.nn.Module:
        return TripletLoss(margin=config.margin * num_classes)

    custom = build_loss(dataclasses.replace(LossConfig(), name="custom"), num_classes=2)  # type: ignore[arg-type]
    assert isinstance(custom, TripletLoss) and custom.margin == pytest.approx(0.4)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("margin")(build_custom)
    assert "custom" not in LOSSES


def test_scarce_close_negatives_are_not_repeated():
    """One negative below 1.4 and three positives: the close one first, then distinct far ones."""
    points = [
        [1, 0, 0],
        [0.99, 0.1, 0],
        [0.98, 0, 0.1],
        [0.97, 0.1, 0.1],
        [0.8, 0.6, 0],
        [-1, 0, 0],
        [-1, 0.1, 0],
        [0, -1, 0],
    ]
    embeddings = torch.nn.functional.normalize(torch.tensor(points), dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3])
    for seed in range(20):
        anchors, _, negatives = distance_weighted_negatives(embeddings, labels, torch.Generator().manual_seed(seed))
        drawn = negatives[anchors == 0].tolist()
        assert len(drawn) == 3 and len(set(drawn)) == 3 and 4 in drawn
