"""CUB-200-2011 (Wah et al. 2011) in its official layout, zero-shot split by class id.

Layout (``CUB_200_2011.tgz`` unpacked)::

    root/classes.txt               "<class_id> <NNN.Name>"        (1-based)
    root/images.txt                "<image_id> <NNN.Name/file.jpg>" (relative to images/)
    root/image_class_labels.txt    "<image_id> <class_id>"        (optional)
    root/images/NNN.Name/*.jpg

Classes 1-100 train (5,864 images), 101-200 test (5,924). The official
``train_test_split.txt`` is the *classification* split and is ignored.
"""

from __future__ import annotations

from pathlib import Path

from dcml.data.benchmarks.common import (
    RECALL_KS,
    Entry,
    build_records,
    parse_int,
    read_lines,
    require_dir,
    require_nonempty,
    require_root,
    split_by_class_id,
    split_fields,
)
from dcml.data.errors import DatasetError
from dcml.data.records import Splits

LAST_TRAIN_CLASS = 100


def load_cub200(root: str | Path) -> Splits:
    """Train classes 1-100 / test classes 101-200; labels remapped per split (0..99 each)."""
    root = require_root(root)
    require_dir(root, "images")
    classes = _read_id_table(root, "classes.txt", "<class_id> <class_name>")
    image_paths = _read_id_table(root, "images.txt", "<image_id> <path>")
    if (root / "image_class_labels.txt").is_file():
        table = _read_id_table(root, "image_class_labels.txt", "<image_id> <class_id>")
        image_classes = {image_id: _class_id(value, image_id, classes) for image_id, value in table.items()}
    else:  # fall back on the class folder named in images.txt
        by_name = {name: class_id for class_id, name in classes.items()}
        image_classes = {i: _class_of_folder(path, i, by_name) for i, path in image_paths.items()}
    entries: list[Entry] = []
    for image_id, relpath in sorted(image_paths.items()):
        if image_id not in image_classes:
            raise DatasetError(f"image_class_labels.txt under {root} has no class for image {image_id}")
        class_id = image_classes[image_id]
        entries.append((f"images/{relpath}", class_id, classes[class_id]))
    train, test = split_by_class_id(entries, LAST_TRAIN_CLASS)
    require_nonempty(train, "training (classes 1-100)", f"{root}/images.txt")
    require_nonempty(test, "test (classes 101-200)", f"{root}/images.txt")
    return Splits(train=build_records(root, train), test=build_records(root, test), recall_ks=RECALL_KS["cub200"])


def _read_id_table(root: Path, relpath: str, expected: str) -> dict[int, str]:
    """``{id: rest of line}`` of a CUB "<id> <value>" file; ids must be unique integers."""
    table: dict[int, str] = {}
    for number, line in read_lines(root, relpath):
        key, value = split_fields(relpath, number, line, expected, maxsplit=1)
        identifier = parse_int(relpath, number, line, key, expected)
        if identifier in table:
            raise DatasetError(f"{relpath} line {number}: duplicate id {identifier} (under {root})")
        table[identifier] = value
    if not table:
        raise DatasetError(f"{relpath} under {root} is empty")
    return table


def _class_id(value: str, image_id: int, classes: dict[int, str]) -> int:
    if not value.isdigit() or int(value) not in classes:
        raise DatasetError(f"image_class_labels.txt: image {image_id} has class {value!r}, not in classes.txt")
    return int(value)


def _class_of_folder(relpath: str, image_id: int, by_name: dict[str, int]) -> int:
    folder = relpath.split("/", 1)[0]
    if folder not in by_name:
        raise DatasetError(f"images.txt: image {image_id} lies in {folder!r}, which is not in classes.txt")
    return by_name[folder]
