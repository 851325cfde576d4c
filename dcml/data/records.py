"""Plain descriptions of a dataset split: image paths with contiguous integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageRecords:
    """Images of one split.

    ``paths[i]`` is an image file, ``labels[i]`` its class id in ``0..len(class_names)-1``
    (contiguous, assigned in sorted order of the original class ids/names, once, by the
    loader). ``class_names[label]`` is the original class identifier as a string.
    """

    paths: tuple[str, ...]
    labels: np.ndarray  # (n,) int64
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        object.__setattr__(self, "labels", labels)
        if labels.shape != (len(self.paths),):
            raise ValueError(f"{len(self.paths)} paths but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError("labels must lie in 0..len(class_names)-1")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Splits:
    """Train and test records of a zero-shot split (test classes unseen in training).

    For query/gallery benchmarks (In-shop) ``query`` and ``gallery`` are set and ``test``
    is their concatenation (query first); evaluation then retrieves queries from the
    gallery only. ``recall_ks`` is the customary list of the dataset.
    """

    train: ImageRecords
    test: ImageRecords
    query: ImageRecords | None = None
    gallery: ImageRecords | None = None
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)


def records_from_pairs(pairs: list[tuple[str, str]]) -> ImageRecords:
    """Build records from ``(path, class_name)`` pairs; labels follow sorted class names."""
    class_names = tuple(sorted({name for _, name in pairs}))
    index = {name: i for i, name in enumerate(class_names)}
    paths = tuple(path for path, _ in pairs)
    labels = np.fromiter((index[name] for _, name in pairs), dtype=np.int64, count=len(pairs))
    return ImageRecords(paths=paths, labels=labels, class_names=class_names)
