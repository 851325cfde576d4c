"""Where dcml follows the authors' TPAMI code: backbone features are L2-normalised before
k-means, a division is clustered in the slices the model was trained with, and the margin
loss keeps float64 (the data-parallel test compares gradients in float64)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dcml import clustering, division
from dcml.config import ClusterConfig
from dcml.losses.margin import MarginLoss


def test_backbone_features_reach_kmeans_with_unit_norm(monkeypatch):
    seen = []
    real = clustering.kmeans

    def recording(embeddings, *args, **kwargs):
        seen.append(np.linalg.norm(embeddings, axis=1))
        return real(embeddings, *args, **kwargs)

    monkeypatch.setattr(clustering, "kmeans", recording)
    rng = np.random.default_rng(0)
    # two directions; norms spread over two orders of magnitude (what raw pooled features do)
    directions = np.repeat(np.eye(8, dtype=np.float32)[:2], 20, axis=0) + 0.05 * rng.normal(size=(40, 8))
    features = (directions * rng.uniform(0.1, 10, size=(40, 1))).astype(np.float32)
    labels = np.repeat(np.arange(10), 4)
    config = dataclasses.replace(ClusterConfig(), space="backbone")
    result = division.next_division(features, labels, 2, config, seed=0)
    assert seen and all(np.allclose(norms, 1, atol=1e-5) for norms in seen)
    # by direction, not by norm: each half of the data is one cluster
    assert len(set(result.assignment[:20])) == 1 and len(set(result.assignment[20:])) == 1
    seen.clear()
    division.next_division(features, labels, 2, ClusterConfig(), seed=0)  # the embedding space: as given
    assert not np.allclose(seen[0], 1)


def test_a_division_is_clustered_in_the_slices_the_model_was_trained_with():
    from dcml.schedule import plan, steps

    segments = plan(12, 4, 2, 8, 8, evaluate_every=4, hierarchical=True)
    new = [(s.segment.start_epoch, s.segment.num_learners, s.cluster_slices) for s in steps(segments, 12, 4)]
    new = [row for row, step in zip(new, steps(segments, 12, 4), strict=True) if step.division == "new"]
    # (epoch, learners after the division, slices it is clustered in): 1 -> 2 -> 4 learners,
    # each split clustered in the slices trained before it, then re-clustered in 4
    assert new == [(0, 1, 1), (2, 2, 1), (4, 4, 2), (6, 4, 4)]
    flat = plan(12, 4, 2, 8, 8, evaluate_every=4)
    assert all(s.cluster_slices == 4 for s in steps(flat, 12, 4) if s.division == "new")  # CVPR: unchanged


def test_the_flow_and_fit_embed_with_the_steps_cluster_slices(monkeypatch, tiny_params):
    from dcml import fit as fit_module
    from dcml.schedule import steps_from_params

    params = dataclasses.replace(
        tiny_params,
        cluster=dataclasses.replace(
            tiny_params.cluster, hierarchical=True, num_learners=2, recluster_every=1, divide_until_epoch=3
        ),
        train=dataclasses.replace(tiny_params.train, epochs=4),
    )
    params = dataclasses.replace(params, cluster=dataclasses.replace(params.cluster, finetune_from_epoch=3))
    asked = []

    class Trainer:
        def __init__(self):
            self.params = params

        def embed(self, dataset, *, num_learners, features):
            asked.append(num_learners)
            rng = np.random.default_rng(len(asked))
            return rng.normal(size=(40, 32)).astype(np.float32), np.repeat(np.arange(10), 4), None

    bundle = type("Bundle", (), {"train_eval": None, "splits": None})()
    previous = None
    new_steps = [s for s in steps_from_params(params) if s.division == "new"]
    for step in new_steps:
        previous = fit_module.division_for_step(Trainer(), bundle, step, previous)
    assert asked == [s.cluster_slices for s in new_steps]
    assert any(s.cluster_slices < s.segment.num_learners for s in new_steps)  # a split was clustered in c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_loss_keeps_the_input_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(24, 8, generator=generator, dtype=dtype), dim=1)
    embeddings.requires_grad_(True)
    labels = torch.arange(6).repeat_interleave(4)
    loss = MarginLoss(num_classes=6)(embeddings, labels, torch.Generator().manual_seed(1))
    loss.backward()
    assert loss.dtype == dtype and embeddings.grad.dtype == dtype
