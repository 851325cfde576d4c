"""Class-balanced batches (P classes x M images) and the round-robin interleaving of learners.

Unlike the authors' code, images are drawn without replacement (a class with fewer
than M images is repeated), and a cluster with few classes or images still yields
batches instead of crashing the interleaver.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class _Cycler:
    """Endless stream over ``items`` in freshly shuffled rounds, taken ``n`` at a time."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = items
        self.rng = rng
        self.queue: list[int] = []

    def take(self, n: int) -> list[int]:
        """``n`` items, all distinct when ``n <= len(items)``; otherwise every item once
        plus ``n - len(items)`` drawn with replacement."""
        distinct = min(n, len(self.items))
        chosen: list[int] = []
        deferred: list[int] = []  # already chosen from the previous round: used next time
        while len(chosen) < distinct:
            if not self.queue:
                self.queue = [int(i) for i in self.rng.permutation(self.items)][::-1]
            item = self.queue.pop()
            (deferred if item in chosen else chosen).append(item)
        self.queue.extend(reversed(deferred))
        extra = self.rng.choice(self.items, size=n - distinct, replace=True) if n > distinct else []
        return chosen + [int(i) for i in extra]


class ClassBalancedBatchSampler:
    """Batches of ``P`` classes x ``M`` images from a subset of a dataset, for one epoch.

    ``labels`` (n,) int holds the labels of the whole dataset, ``indices`` (m,) int the
    dataset indices of the subset (e.g. one cluster). Classes with fewer than 2 images in
    the subset cannot form a positive pair and are ignored. Each batch is a ``list[int]``
    of dataset indices, grouped per class: ``P' = min(P, usable classes)`` distinct
    classes, ``M`` images each, drawn without replacement (a class with fewer than ``M``
    images contributes all of them plus repeats). Classes and images are consumed from
    shuffled rounds, so the epoch covers them evenly. An epoch has
    ``max(1, ceil(usable images / (P' * M)))`` batches, or none when fewer than 2 classes
    are usable (callers must guard against that). The shuffle is fixed by
    ``(seed, epoch)``; call :meth:`set_epoch` before iterating.
    """

    def __init__(
        self,
        labels: np.ndarray,
        indices: np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        seed: int,
    ) -> None:
        if classes_per_batch < 1 or images_per_class < 1:
            raise ValueError(
                f"need classes_per_batch >= 1 and images_per_class >= 1, got {classes_per_batch} and {images_per_class}"
            )
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        subset_labels = np.asarray(labels, dtype=np.int64)[indices]
        classes, counts = np.unique(subset_labels, return_counts=True)
        self.classes = classes[counts >= 2]
        self.members = {int(c): indices[subset_labels == c] for c in self.classes}
        self.num_images = int(counts[counts >= 2].sum())
        self.num_ignored_images = int(counts[counts < 2].sum())
        self.classes_per_batch = min(classes_per_batch, len(self.classes))
        self.images_per_class = images_per_class
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` for the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        if len(self.classes) < 2:
            return 0
        return max(1, math.ceil(self.num_images / (self.classes_per_batch * self.images_per_class)))

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        class_stream = _Cycler(self.classes, rng)
        image_streams = {c: _Cycler(members, rng) for c, members in self.members.items()}
        for _ in range(len(self)):
            chosen = class_stream.take(self.classes_per_batch)
            yield [i for c in chosen for i in image_streams[c].take(self.images_per_class)]


def interleave_round_robin(samplers: Sequence[Iterable[list[int]]]) -> Iterator[tuple[int, list[int]]]:
    """``(learner, batch)`` pairs taking one batch from each sampler in turn (0, 1, ..., K-1,
    0, 1, ...); exhausted samplers are skipped until all are exhausted."""
    iterators = [iter(sampler) for sampler in samplers]
    active = list(range(len(iterators)))
    while active:
        still_active = []
        for learner in active:
            batch = next(iterators[learner], None)
            if batch is not None:
                yield learner, batch
                still_active.append(learner)
        active = still_active
