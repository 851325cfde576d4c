"""TPAMI'21 hierarchical division: 1 -> 2 -> 4 .. K clusters by 2-means splits that nest."""

import dataclasses

import numpy as np
import torch

from dcml.config import ClusterConfig
from dcml.data import build_bundle, load_splits
from dcml.division import all_data, next_division
from dcml.fit import fit
from dcml.schedule import plan, steps

r = dataclasses.replace


def test_the_clusters_double_at_each_division_up_to_k():
    segments = plan(10, 4, 2, 8, 8, hierarchical=True)
    clustered = [(s.start_epoch, s.num_clusters, s.recluster) for s in segments if s.mode != "finetune"]
    assert clustered == [(0, 1, True), (2, 2, True), (4, 4, True), (6, 4, True)]
    assert [s.num_learners for s in segments] == [1, 2, 4, 4, 1]
    assert [step.division_index for step in steps(segments, 10, 2)] == [0, 1, 2, 3, -1]
    # flat division: K clusters from the first one
    assert {s.num_clusters for s in plan(10, 4, 2, 8, 8) if s.mode != "finetune"} == {4}


def separable(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four tight blobs: two far-apart pairs (blob b at x = 100*(b//2) + 10*(b%2)),
    each blob holding 5 classes of 4 images."""
    rng = np.random.default_rng(seed)
    blob = np.repeat(np.arange(4), 20)
    centres = np.stack([100.0 * (blob // 2) + 10.0 * (blob % 2), np.zeros_like(blob, dtype=float)], axis=1)
    x = (centres + rng.normal(0, 0.5, (80, 2))).astype(np.float32)
    labels = np.repeat(np.arange(20), 4)
    order = rng.permutation(80)
    return x[order], labels[order], blob[order]


def test_splits_nest_and_learners_stay_matched_to_their_parents_data():
    x, labels, blob = separable()
    config = ClusterConfig(num_learners=4, hierarchical=True, niter=20)
    first = next_division(x, labels, 1, config, seed=0)
    assert first.num_clusters == 1 and (first.assignment == 0).all()

    second = next_division(x, labels, 2, config, seed=1, previous=first)
    pairs = second.assignment
    assert second.num_clusters == 2
    assert len({(p, b // 2) for p, b in zip(pairs, blob, strict=True)}) == 2  # one cluster per far pair

    third = next_division(x, labels, 4, config, seed=2, previous=second)
    assert third.num_clusters == 4
    np.testing.assert_array_equal(third.assignment // 2, pairs)  # children 2j, 2j+1 inside parent j
    assert len({(c, b) for c, b in zip(third.assignment, blob, strict=True)}) == 4  # one blob each
    assert third.stats["learner_kept"] == 1.0

    # at K, re-clustering is k-means with K matched to the previous division: nothing moves
    jittered = x + np.random.default_rng(9).normal(0, 0.05, x.shape).astype(np.float32)
    fourth = next_division(jittered, labels, 4, config, seed=3, previous=third)
    np.testing.assert_array_equal(fourth.assignment, third.assignment)
    assert fourth.stats["learner_kept"] == 1.0


def test_the_second_division_splits_the_previous_clusters_even_if_kmeans_numbers_them_otherwise():
    """Children follow the previous division's learner ids: a relabelled previous division
    gives children under the relabelled parents."""
    x, labels, blob = separable(1)
    config = ClusterConfig(num_learners=4, hierarchical=True)
    previous = all_data(len(labels))
    parents = next_division(x, labels, 2, config, seed=5, previous=previous)
    swapped = r(parents, assignment=1 - parents.assignment)
    children = next_division(x, labels, 4, config, seed=6, previous=swapped)
    np.testing.assert_array_equal(children.assignment // 2, swapped.assignment)


def test_fit_with_masks_and_hierarchical_division_grows_the_learners(tiny_params):
    params = r(
        tiny_params,
        model=r(tiny_params.model, learners="masks"),
        train=r(tiny_params.train, epochs=4),
        cluster=r(tiny_params.cluster, hierarchical=True, divide_until_epoch=3, finetune_from_epoch=3),
    )
    bundle = build_bundle(load_splits(params.data), params.data)
    result = fit(params, bundle, torch.device("cpu"))
    assert [(epoch, d.num_clusters) for epoch, d in result.divisions] == [(0, 1), (1, 2), (2, 4)]
    masks = result.trainer.model.masks
    assert int(masks.level) == 4
    # every mask has learned (none is still the initial ones) and the learners differ
    weight = masks.weight.detach()
    assert not torch.equal(weight, torch.ones_like(weight))
    assert masks.penalty(4).item() < 1.0
    assert [s.mask_penalty > 0 for s in result.epochs] == [False, True, True, False]
