"""Datasets: class-folder images, the five benchmarks, the demo generator, samplers.

:func:`load_splits` turns a :class:`~dcml.config.DataConfig` into train/test records;
:func:`build_bundle` wraps them into torch datasets with the right transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.utils.data import Dataset

from dcml.config import DataConfig
from dcml.data.demo import demo_class_split
from dcml.data.errors import DatasetError
from dcml.data.folder import ImageDataset, drop_unreadable, scan_class_folder, split_by_classes
from dcml.data.records import Splits
from dcml.data.transforms import eval_transform, train_transform

__all__ = ["DatasetBundle", "DatasetError", "build_bundle", "load_splits", "retrieval_size"]


def load_splits(config: DataConfig) -> Splits:
    """Read the records of ``config.dataset`` under ``config.root`` (no image decoding)."""
    if config.dataset in ("demo", "folder"):
        records = scan_class_folder(config.root)
        train_classes, test_classes = config.split.train_classes, config.split.test_classes
        if config.dataset == "demo" and not train_classes:
            # Sorted names would put whole factor groups on one side; the demo's own
            # split has every group and factor value in both train and test.
            train_classes, test_classes = demo_class_split()
        return split_by_classes(
            records,
            train_ratio=config.split.train_ratio,
            train_classes=train_classes,
            test_classes=test_classes,
        )
    from dcml.data.benchmarks import load_benchmark

    kwargs = {"test_size": config.vehicleid_test_size} if config.dataset == "vehicleid" else {}
    return load_benchmark(config.dataset, config.root, **kwargs)


def retrieval_size(splits: Splits) -> int:
    """How many items one test query searches: the gallery, or every other test image."""
    return len(splits.gallery) if splits.gallery is not None else len(splits.test) - 1


@dataclass(frozen=True)
class DatasetBundle:
    """The torch datasets one run needs, and how many unreadable files were skipped."""

    splits: Splits
    train: Dataset  # train records, train transforms
    train_eval: Dataset  # train records, eval transforms (for clustering)
    test: Dataset  # test records (query first, then gallery), eval transforms
    skipped: tuple[str, ...] = ()  # unreadable files dropped with data.skip_corrupt

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def build_bundle(splits: Splits, config: DataConfig) -> DatasetBundle:
    """Datasets with the method's transforms (docs/method.md); with ``skip_corrupt`` unreadable files are dropped."""
    skipped: tuple[str, ...] = ()
    if config.skip_corrupt:
        splits, skipped = _without_unreadable(splits)
    train_tf = train_transform(config.image_size, config.crop_scale_min)
    eval_tf = eval_transform(config.image_size, config.resize_size)
    return DatasetBundle(
        splits=splits,
        train=ImageDataset(splits.train, train_tf),
        train_eval=ImageDataset(splits.train, eval_tf),
        test=ImageDataset(splits.test, eval_tf),
        skipped=skipped,
    )


def _without_unreadable(splits: Splits) -> tuple[Splits, tuple[str, ...]]:
    if splits.query is not None:
        raise DatasetError("data.skip_corrupt is not supported for query/gallery datasets")
    train, bad_train = drop_unreadable(splits.train)
    test, bad_test = drop_unreadable(splits.test)
    return replace(splits, train=train, test=test), tuple(bad_train) + tuple(bad_test)
