"""TPAMI'21 learner masks: equivalence with slices, the decorrelation penalty, growth,
checkpoints and resume."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcml.config import ConfigError, validate, with_num_learners
from dcml.data import build_bundle, load_splits
from dcml.division import all_data, next_division
from dcml.losses import build_loss
from dcml.masks import LearnerMasks
from dcml.model import Embedder, learner_slice
from dcml.schedule import Segment
from dcml.train import build_optimizer
from dcml.trainer import Trainer

CPU = torch.device("cpu")
r = dataclasses.replace


def masks_params(params, **model):
    return r(params, model=r(params.model, learners="masks", **model))


def test_indicator_masks_with_lambda_0_and_frozen_masks_train_exactly_like_slices(tiny_params):
    """Masks = the slices' indicator vectors, lambda 0, mask lr 0: each learner's embedding
    is its slice padded with zeros, so distances, the loss and every update are the sliced ones."""
    K, d = 4, tiny_params.model.embedding_dim
    loss_config = r(tiny_params.loss, negative_sampler="nearest_beyond_cutoff")  # no dimension in the sampler
    sliced_params = r(tiny_params, loss=loss_config)
    masked_params = r(
        masks_params(sliced_params, mask_init="slices", mask_decorrelation=0.0),
        train=r(tiny_params.train, lr_masks=0.0),
    )
    torch.manual_seed(0)
    sliced = Embedder(sliced_params.model, num_learners_init=K)
    masked = Embedder(masked_params.model, num_learners_init=K)
    missing = masked.load_state_dict(sliced.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["masks._extra_state", "masks.weight"]
    for model in (sliced, masked):
        model.dropout.p = 0.0
    optimizers = [
        build_optimizer(m, torch.nn.Identity(), p.train, 0.0)
        for m, p in ((sliced, sliced_params), (masked, masked_params))
    ]
    loss_fn = build_loss(loss_config, num_classes=8)
    generator = torch.Generator()
    images = torch.randn(16, 3, 32, 32)
    labels = torch.arange(4).repeat_interleave(4)
    for step in range(3):
        learner = step % K
        dims = learner_slice(d, K, learner)
        a = sliced(images, num_learners=K, learner=learner)
        b = masked(images, num_learners=K, learner=learner)
        torch.testing.assert_close(b[:, dims], a)
        assert torch.count_nonzero(b) == torch.count_nonzero(b[:, dims])
        losses = []
        for optimizer, embedding in ((optimizers[0], a), (optimizers[1], b)):
            loss = loss_fn(embedding, labels, generator=generator.manual_seed(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(masked.embedding.weight, sliced.embedding.weight)
    torch.testing.assert_close(masked.backbone[0][0].weight, sliced.backbone[0][0].weight)


def test_penalty_is_the_mean_pairwise_cosine_and_pushes_similar_masks_apart():
    masks = LearnerMasks(4, 6)
    with torch.no_grad():
        masks.weight.copy_(torch.tensor(np.random.default_rng(0).normal(0.5, 1.0, (4, 6)), dtype=torch.float32))
    relu = np.maximum(masks.weight.detach().numpy(), 0)
    unit = relu / np.linalg.norm(relu, axis=1, keepdims=True)
    reference = (unit @ unit.T)[~np.eye(4, dtype=bool)].mean()
    assert masks.penalty(4).item() == pytest.approx(reference, rel=1e-5)
    assert masks.penalty(1).item() == 0.0

    pair = LearnerMasks(2, 8)
    with torch.no_grad():  # two almost equal masks (exactly equal ones are a stationary point)
        pair.weight[1] += 0.01 * torch.randn(8, generator=torch.Generator().manual_seed(1))
    before = pair.penalty(2).item()
    assert before > 0.99
    optimizer = torch.optim.Adam(pair.parameters(), lr=0.05)  # as in training: the masks' Adam group
    values = []
    for _ in range(30):
        optimizer.zero_grad()
        penalty = pair.penalty(2)
        penalty.backward()
        optimizer.step()
        values.append(penalty.item())
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))
    assert pair.penalty(2).item() < 0.1  # driven to (nearly) disjoint supports
    assert (pair.weight[0] - pair.weight[1]).norm() > 0.5


def test_hierarchical_masks_start_as_one_and_children_copy_their_parent_and_its_adam_moments():
    masks = LearnerMasks(4, 5, hierarchical=True)
    assert int(masks.level) == 1 and masks.row(1, 0) == 0
    with pytest.raises(ValueError, match="grow first"):
        masks.row(2, 1)
    optimizer = torch.optim.Adam(masks.parameters(), lr=0.1)
    with torch.no_grad():
        masks.weight.copy_(torch.arange(20, dtype=torch.float32).reshape(4, 5))
    (masks.weight[0].sum()).backward()
    optimizer.step()  # moments exist for row 0 only
    masks.grow(2, optimizer)
    assert int(masks.level) == 2 and [masks.row(2, j) for j in range(2)] == [0, 2]
    torch.testing.assert_close(masks.weight[2], masks.weight[0])
    state = optimizer.state[masks.weight]
    torch.testing.assert_close(state["exp_avg"][2], state["exp_avg"][0])
    assert state["exp_avg"][0].abs().sum() > 0
    with torch.no_grad():
        masks.weight[2] += 100.0  # the two halves diverge
    masks.grow(4, optimizer)
    assert [masks.row(4, j) for j in range(4)] == [0, 1, 2, 3]
    torch.testing.assert_close(masks.weight[1], masks.weight[0])
    torch.testing.assert_close(masks.weight[3], masks.weight[2])
    assert not torch.equal(masks.weight[1], masks.weight[3])


def test_full_embedding_ignores_the_masks_and_masks_are_their_own_optimiser_group(tiny_params):
    params = masks_params(tiny_params)
    trainer = Trainer.create(params, 8, CPU)
    model = trainer.model.eval()
    images = torch.randn(4, 3, 32, 32)
    raw = model.embedding(model.pool(model.backbone(images)).flatten(1))
    torch.testing.assert_close(model(images, num_learners=4), F.normalize(raw, dim=1))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["masks"]["lr"] == params.train.lr_masks and groups["masks"]["weight_decay"] == 0.0
    assert groups["masks"]["params"][0] is model.masks.weight


def test_reset_at_a_split_empties_the_masks_adam_state_and_children_equal_their_parent():
    """The authors' code: new mask parameters (fresh Adam, step 0) at every split."""
    masks = LearnerMasks(4, 5, hierarchical=True)
    optimizer = torch.optim.Adam(masks.parameters(), lr=0.1)
    (masks.weight[0].sum()).backward()
    optimizer.step()
    parent = masks.weight[0].detach().clone()
    masks.grow(2, optimizer, reset_state=True)
    assert masks.weight not in optimizer.state or not optimizer.state[masks.weight]
    torch.testing.assert_close(masks.weight[0], parent)
    torch.testing.assert_close(masks.weight[2], parent)
    masks.weight.grad = torch.ones_like(masks.weight)
    optimizer.step()  # Adam starts over: its step count is 1 after the split
    assert int(optimizer.state[masks.weight]["step"]) == 1


@pytest.mark.parametrize("split_state", ["inherit", "reset"])
def test_hierarchical_masks_are_checkpointed_and_a_resume_grows_them_bit_identically(
    tmp_path, tiny_params, split_state
):
    """Segment 1 trains one mask on all data; segment 2 splits into two clusters (the
    child copies the mask): resuming between the two equals the uninterrupted run."""
    cluster = r(tiny_params.cluster, hierarchical=True, divide_until_epoch=3, finetune_from_epoch=3)
    params = r(masks_params(tiny_params), cluster=cluster)
    params = r(params, model=r(params.model, mask_split_state=split_state))
    bundle = build_bundle(load_splits(params.data), params.data)
    labels = bundle.splits.train.labels
    first, second = Segment(0, 1, "divide", True, 1, 0), Segment(1, 2, "divide", True, 2, 1)
    trainer = Trainer.create(params, bundle.splits.train.num_classes, CPU)
    initial = trainer.model.masks.weight.detach().clone()
    stats = trainer.train_segment(first, bundle.train, labels, all_data(len(labels)))
    assert stats[0].mask_penalty == 0.0  # one mask: nothing to decorrelate
    assert not torch.equal(trainer.model.masks.weight[0], initial[0])  # the mask learns
    path = trainer.save(tmp_path / "epoch-1.pt")
    embeddings, _, _ = trainer.embed(bundle.train_eval)
    division = next_division(embeddings, labels, 2, params.cluster, seed=1, previous=all_data(len(labels)))
    trainer.train_segment(second, bundle.train, labels, division)
    assert trainer.model.masks.level == 2

    resumed = Trainer.from_checkpoint(path, CPU)
    assert resumed.model.masks.level == 1
    resumed.train_segment(second, bundle.train, labels, division)
    state, expected = resumed.model.state_dict(), trainer.model.state_dict()
    assert state.keys() == expected.keys() and state["masks._extra_state"] == {"level": 2}
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(
            resumed.optimizer.state[resumed.model.masks.weight][key],
            trainer.optimizer.state[trainer.model.masks.weight][key],
            rtol=0,
            atol=0,
        )
    steps = int(trainer.optimizer.state[trainer.model.masks.weight]["step"])
    assert steps == int(resumed.optimizer.state[resumed.model.masks.weight]["step"])
    # reset: Adam restarted at the split, so it counts only the second segment's steps
    backbone_steps = int(trainer.optimizer.state[next(trainer.model.backbone.parameters())]["step"])
    assert (steps < backbone_steps) == (split_state == "reset")


def test_config_rules_for_masks_and_hierarchical_division(tiny_params):
    hierarchical = r(masks_params(tiny_params), cluster=r(tiny_params.cluster, hierarchical=True, num_learners=3))
    with pytest.raises(ConfigError, match="power of two"):
        validate(hierarchical)
    # masks do not need d divisible by K; slices do
    odd = r(tiny_params, model=r(tiny_params.model, embedding_dim=30), sweep=r(tiny_params.sweep, num_learners=(1,)))
    with pytest.raises(ConfigError, match="divisible"):
        validate(odd)
    validate(masks_params(odd))
    # K=1 is the plain baseline whatever the variant: same params as the slices baseline
    tpami = r(masks_params(tiny_params), cluster=r(tiny_params.cluster, hierarchical=True))
    assert with_num_learners(tpami, 1) == with_num_learners(tiny_params, 1)
