"""Stanford Cars / CARS196 (Krause et al. 2013) in its official layout, split by class id.

Layout (``car_ims.tgz`` unpacked next to ``cars_annos.mat``)::

    root/car_ims/000001.jpg ... 016185.jpg
    root/cars_annos.mat    struct array ``annotations`` (1 x 16,185) with fields
                           relative_im_path ("car_ims/000001.jpg"), bbox_x1, bbox_y1,
                           bbox_x2, bbox_y2, class (1-based), test; cell ``class_names``

Classes 1-98 train (8,054 images), 99-196 test (8,131). The ``test`` flag is the
classification split and is ignored; bounding boxes are not used (as in the paper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from dcml.data.benchmarks.common import (
    RECALL_KS,
    Entry,
    build_records,
    require_dir,
    require_file,
    require_nonempty,
    require_root,
    split_by_class_id,
)
from dcml.data.errors import DatasetError
from dcml.data.records import Splits

LAST_TRAIN_CLASS = 98
ANNOTATIONS = "cars_annos.mat"
REQUIRED_FIELDS = ("relative_im_path", "class")


def load_cars196(root: str | Path) -> Splits:
    """Train classes 1-98 / test classes 99-196; labels remapped per split (0..97 each)."""
    root = require_root(root)
    path = require_file(root, ANNOTATIONS)
    require_dir(root, "car_ims")
    entries = read_annotations(path)
    train, test = split_by_class_id(entries, LAST_TRAIN_CLASS)
    require_nonempty(train, "training (classes 1-98)", str(path))
    require_nonempty(test, "test (classes 99-196)", str(path))
    return Splits(train=build_records(root, train), test=build_records(root, test), recall_ks=RECALL_KS["cars196"])


def read_annotations(path: Path) -> list[Entry]:
    """``(relative path, class id, class name)`` of every record of ``cars_annos.mat``."""
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as error:  # scipy raises several types for a bad file
        raise DatasetError(f"{ANNOTATIONS} cannot be read ({path}): {error}") from error
    annotations = mat.get("annotations")
    if not isinstance(annotations, np.ndarray) or annotations.dtype.names is None:
        raise DatasetError(f"{ANNOTATIONS} has no struct array 'annotations' ({path})")
    missing = [name for name in REQUIRED_FIELDS if name not in annotations.dtype.names]
    if missing:
        raise DatasetError(f"{ANNOTATIONS}: 'annotations' lacks field(s) {missing} ({path})")
    names = _class_names(mat.get("class_names"))
    entries: list[Entry] = []
    for number, record in enumerate(annotations.ravel(), 1):  # the real file is 1 x N
        try:
            relpath = str(_scalar(record["relative_im_path"]))
            class_id = int(_scalar(record["class"]))
        except (IndexError, TypeError, ValueError) as error:
            raise DatasetError(f"{ANNOTATIONS} annotation {number}: malformed ({error}) ({path})") from error
        entries.append((relpath, class_id, names.get(class_id, str(class_id))))
    if not entries:
        raise DatasetError(f"{ANNOTATIONS} lists no images ({path})")
    return entries


def _scalar(value: Any) -> Any:
    """MATLAB values load as nested arrays (``[['x']]``, ``[[1]]``); take the one item."""
    flat = np.ravel(value)
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    return flat[0]


def _class_names(cell: Any) -> dict[int, str]:
    """``{1-based class id: name}`` from the ``class_names`` cell array (empty if absent)."""
    if not isinstance(cell, np.ndarray):
        return {}
    return {class_id: str(_scalar(name)) for class_id, name in enumerate(cell.ravel(), 1)}
