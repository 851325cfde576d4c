"""The five benchmarks of the paper: loaders, registry, recall@k lists and ``inspect_dataset``.

Every loader reads the dataset's *official* layout under ``root`` and returns
:class:`~dcml.data.records.Splits` for the zero-shot protocol (test classes unseen in
training), with ``Splits.recall_ks`` set to the dataset's customary list. A wrong or
partial layout raises :class:`~dcml.data.errors.DatasetError` naming what is missing;
missing *image files* are not an error at load time (``inspect_dataset`` counts them).
See ``docs/datasets.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcml.config import SplitConfig
from dcml.data.benchmarks.cars196 import load_cars196
from dcml.data.benchmarks.checks import summarize_split
from dcml.data.benchmarks.common import RECALL_KS
from dcml.data.benchmarks.cub200 import load_cub200
from dcml.data.benchmarks.inshop import load_inshop
from dcml.data.benchmarks.sop import load_sop
from dcml.data.benchmarks.vehicleid import TEST_SIZES, load_vehicleid
from dcml.data.errors import DatasetError
from dcml.data.folder import scan_class_folder, split_by_classes
from dcml.data.records import ImageRecords, Splits

__all__ = [
    "BENCHMARKS",
    "RECALL_KS",
    "VEHICLEID_TEST_SIZES",
    "inspect_dataset",
    "load_benchmark",
    "load_cars196",
    "load_cub200",
    "load_inshop",
    "load_sop",
    "load_vehicleid",
]

VEHICLEID_TEST_SIZES = TEST_SIZES

BENCHMARKS: dict[str, Callable[..., Splits]] = {
    "cub200": load_cub200,
    "cars196": load_cars196,
    "sop": load_sop,
    "inshop": load_inshop,
    "vehicleid": load_vehicleid,
}


def load_benchmark(name: str, root: str | Path, **kwargs: Any) -> Splits:
    """Load benchmark ``name`` from ``root``; ``kwargs`` go to its loader (``test_size`` for VehicleID)."""
    if name not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name](root, **kwargs)


def inspect_dataset(
    name: str,
    root: str | Path,
    *,
    check_images: bool = True,
    vehicleid_test_size: int | None = None,
    folder_split: SplitConfig | None = None,
) -> dict[str, Any]:
    """Validate a dataset folder and count, per split, images, classes, missing and unreadable files.

    Returns a JSON-able dict ``{"dataset", "root", "splits": {split: summary}}`` with splits
    ``train``/``test`` (In-shop: ``train``/``query``/``gallery``; VehicleID: ``train`` and
    ``test_800``/``test_1600``/``test_2400``, or only ``test_<vehicleid_test_size>``).
    Each summary is :func:`~dcml.data.benchmarks.checks.summarize_split`'s, and every
    non-train split adds ``classes_shared_with_train`` (0 for a zero-shot split); the
    In-shop query split adds ``items_without_gallery``. Layout errors raise
    :class:`DatasetError` before any image is looked at.
    """
    named = _named_splits(name, root, vehicleid_test_size, folder_split)
    train_classes = _present_classes(named["train"])
    report: dict[str, Any] = {}
    for split, records in named.items():
        summary = summarize_split(records, check_images=check_images)
        if split != "train":
            summary["classes_shared_with_train"] = len(train_classes & _present_classes(records))
        report[split] = summary
    if "query" in named:
        without = _present_classes(named["query"]) - _present_classes(named["gallery"])
        report["query"]["items_without_gallery"] = len(without)
    return {"dataset": name, "root": str(root), "splits": report}


def _named_splits(
    name: str, root: str | Path, vehicleid_test_size: int | None, folder_split: SplitConfig | None = None
) -> dict[str, ImageRecords]:
    """All splits to inspect, loaded (and so validated) before any counting starts. ``folder``:
    a class-folder dataset split as ``folder_split`` (``data.split``) says, default half/half."""
    if name == "folder":
        split = folder_split or SplitConfig()
        splits = split_by_classes(
            scan_class_folder(root),
            train_ratio=split.train_ratio,
            train_classes=split.train_classes,
            test_classes=split.test_classes,
        )
        return {"train": splits.train, "test": splits.test}
    if name == "vehicleid":
        sizes = TEST_SIZES if vehicleid_test_size is None else (vehicleid_test_size,)
        loaded = {size: load_vehicleid(root, test_size=size) for size in sizes}
        first = loaded[sizes[0]]
        return {"train": first.train, **{f"test_{size}": splits.test for size, splits in loaded.items()}}
    splits = load_benchmark(name, root)
    if splits.query is not None and splits.gallery is not None:
        return {"train": splits.train, "query": splits.query, "gallery": splits.gallery}
    return {"train": splits.train, "test": splits.test}


def _present_classes(records: ImageRecords) -> set[str]:
    """Names of the classes that have images in ``records`` (query/gallery share a label space)."""
    return {records.class_names[label] for label in set(records.labels.tolist())}
