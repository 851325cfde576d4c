import math
from collections import Counter

import numpy as np
import pytest

from dcml.data.samplers import ClassBalancedBatchSampler, interleave_round_robin


def _labels(counts: list[int]) -> np.ndarray:
    """Labels of a dataset where class ``c`` has ``counts[c]`` images, in class order."""
    return np.repeat(np.arange(len(counts)), counts)


def _sampler(counts: list[int], p: int, m: int, seed: int = 0, indices=None) -> ClassBalancedBatchSampler:
    labels = _labels(counts)
    indices = np.arange(len(labels)) if indices is None else indices
    return ClassBalancedBatchSampler(labels, indices, classes_per_batch=p, images_per_class=m, seed=seed)


def _check_batch(batch: list[int], labels: np.ndarray, p: int, m: int) -> None:
    assert len(batch) == p * m
    per_class = Counter(labels[batch].tolist())
    assert len(per_class) == p and set(per_class.values()) == {m}


def test_batches_are_p_classes_times_m_images_without_duplicates() -> None:
    counts = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    sampler = _sampler(counts, p=4, m=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(sum(counts) / 12)
    for batch in batches:
        _check_batch(batch, _labels(counts), 4, 3)
        assert len(set(batch)) == len(batch)


def test_one_epoch_covers_every_image_once_when_sizes_divide() -> None:
    sampler = _sampler([8] * 10, p=5, m=4)
    batches = list(sampler)
    assert len(batches) == 4
    assert sorted(i for b in batches for i in b) == list(range(80))


def test_classes_are_covered_evenly() -> None:
    counts = [6] * 7
    sampler = _sampler(counts, p=3, m=2)
    labels = _labels(counts)
    appearances = Counter(c for batch in sampler for c in set(labels[batch].tolist()))
    assert len(appearances) == 7 and max(appearances.values()) - min(appearances.values()) <= 1


def test_small_class_is_repeated_only_itself() -> None:
    counts = [2, 10, 10, 10]
    labels = _labels(counts)
    for epoch in range(5):
        sampler = _sampler(counts, p=4, m=4)
        sampler.set_epoch(epoch)
        for batch in sampler:
            _check_batch(batch, labels, 4, 4)
            small = [i for i in batch if labels[i] == 0]
            assert set(small) == {0, 1}
            others = [i for i in batch if labels[i] != 0]
            assert len(set(others)) == len(others)


def test_fewer_classes_than_p_uses_all_classes() -> None:
    sampler = _sampler([6, 6, 6], p=5, m=2)
    batches = list(sampler)
    assert len(batches) == 3
    for batch in batches:
        _check_batch(batch, _labels([6, 6, 6]), 3, 2)


def test_cluster_smaller_than_one_batch_still_yields_a_batch() -> None:
    sampler = _sampler([2, 3], p=20, m=4)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 1
    _check_batch(batches[0], _labels([2, 3]), 2, 4)


def test_singletons_ignored_and_under_two_usable_classes_yield_nothing() -> None:
    sampler = _sampler([1, 5, 1, 4], p=2, m=2)
    assert sampler.num_ignored_images == 2
    assert {0, 6}.isdisjoint(i for b in sampler for i in b)
    lonely = _sampler([1, 10, 1], p=2, m=2)
    assert len(lonely) == 0 and list(lonely) == []
    assert len(_sampler([3], p=2, m=2)) == 0


def test_only_subset_indices_are_used() -> None:
    counts = [10] * 6
    subset = np.array([i for i in range(60) if i % 10 < 4 and i // 10 in (1, 3, 4)])
    batches = list(_sampler(counts, p=3, m=2, indices=subset))
    assert len(batches) == 2
    assert set(i for b in batches for i in b) <= set(subset.tolist())


def test_determinism_per_seed_and_epoch() -> None:
    def epoch_batches(seed: int, epoch: int) -> list[list[int]]:
        sampler = _sampler([7] * 12, p=4, m=3, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 0) == epoch_batches(0, 0)
    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(0, 1)
    assert epoch_batches(0, 0) != epoch_batches(1, 0)


def test_invalid_sizes_rejected() -> None:
    with pytest.raises(ValueError):
        _sampler([4, 4], p=0, m=2)


def test_round_robin_order_with_uneven_lengths() -> None:
    samplers = [[["a0"], ["a1"], ["a2"]], [["b0"]], [], [["d0"], ["d1"]]]
    order = list(interleave_round_robin(samplers))
    assert order == [(0, ["a0"]), (1, ["b0"]), (3, ["d0"]), (0, ["a1"]), (3, ["d1"]), (0, ["a2"])]
    assert list(interleave_round_robin([])) == []


def test_round_robin_over_real_samplers_never_crashes_on_small_clusters() -> None:
    labels = _labels([10] * 8 + [2, 2] + [1, 1])
    clusters = [np.arange(0, 40), np.arange(40, 80), np.arange(80, 84), np.arange(84, 86)]
    samplers = [ClassBalancedBatchSampler(labels, c, 2, 4, seed=3) for c in clusters]
    learners = Counter(k for k, _ in interleave_round_robin(samplers))
    assert learners == {0: 5, 1: 5, 2: 1}
