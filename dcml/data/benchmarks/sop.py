"""Stanford Online Products (Oh Song et al. 2016) in its official layout.

Layout (``Stanford_Online_Products.zip`` unpacked)::

    root/Ebay_train.txt    header "image_id class_id super_class_id path", then rows
    root/Ebay_test.txt     "1 1 1 bicycle_final/111085122871_0.JPG" (1-based ids)
    root/<category>_final/<image>.JPG

The split is given by the two files: 11,318 classes (59,551 images) train,
11,316 classes (60,502 images) test, class ids disjoint.
"""

from __future__ import annotations

from pathlib import Path

from dcml.data.benchmarks.common import (
    RECALL_KS,
    Entry,
    build_records,
    parse_int,
    read_lines,
    require_nonempty,
    require_root,
    split_fields,
)
from dcml.data.errors import DatasetError
from dcml.data.records import Splits

HEADER = "image_id class_id super_class_id path"
COLUMNS = "<image_id> <class_id> <super_class_id> <path>"


def load_sop(root: str | Path) -> Splits:
    """Train from ``Ebay_train.txt``, test from ``Ebay_test.txt``; labels remapped per split."""
    root = require_root(root)
    train = read_split_file(root, "Ebay_train.txt")
    test = read_split_file(root, "Ebay_test.txt")
    shared = {class_id for _, class_id, _ in train} & {class_id for _, class_id, _ in test}
    if shared:
        raise DatasetError(
            f"Ebay_train.txt and Ebay_test.txt under {root} share {len(shared)} class id(s) "
            f"(e.g. {min(shared)}); the zero-shot split needs disjoint classes"
        )
    _require_image_folders(root, train + test)
    return Splits(train=build_records(root, train), test=build_records(root, test), recall_ks=RECALL_KS["sop"])


def read_split_file(root: Path, relpath: str) -> list[Entry]:
    """Rows of an ``Ebay_*.txt`` file as ``(path, class id, class id as text)``."""
    lines = read_lines(root, relpath)
    if not lines or lines[0][1].split() != HEADER.split():
        got = lines[0][1] if lines else ""
        raise DatasetError(f"{relpath} line 1: expected header '{HEADER}', got {got!r} (under {root})")
    entries: list[Entry] = []
    for number, line in lines[1:]:
        image_id, class_id, super_id, path = split_fields(relpath, number, line, COLUMNS)
        for token in (image_id, class_id, super_id):
            parse_int(relpath, number, line, token, COLUMNS)
        entries.append((path, int(class_id), class_id))
    require_nonempty(entries, "training" if "train" in relpath else "test", f"{root}/{relpath}")
    return entries


def _require_image_folders(root: Path, entries: list[Entry]) -> None:
    """Every category folder named in the lists must exist (single images may be missing)."""
    folders = sorted({relpath.split("/", 1)[0] for relpath, _, _ in entries if "/" in relpath})
    absent = [folder for folder in folders if not (root / folder).is_dir()]
    if absent:
        listed = ", ".join(f"{folder}/" for folder in absent[:5])
        more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise DatasetError(f"image folder(s) {listed}{more} not found under {root}")
