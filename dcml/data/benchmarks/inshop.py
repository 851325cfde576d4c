"""DeepFashion In-shop Clothes Retrieval (Liu et al. 2016) in its official layout.

Layout (``Img/img.zip`` unpacked into ``root/img``, ``Eval/`` copied as is)::

    root/Eval/list_eval_partition.txt   line 1: number of images (52,712)
                                        line 2: "image_name item_id evaluation_status"
                                        rows:   "img/WOMEN/Dresses/id_00000002/02_1_front.jpg
                                                 id_00000002  train|query|gallery"
    root/img/<MEN|WOMEN>/<category>/<item>/<image>.jpg

Train: 3,997 items (25,882 images). Test: 14,218 queries searched against a gallery of
12,612 images over 3,985 items. Query and gallery share one label space (same item,
same label); ``Splits.test`` is query followed by gallery.
"""

from __future__ import annotations

import re
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
    split_fields,
)
from dcml.data.errors import DatasetError
from dcml.data.records import Splits

PARTITION = "Eval/list_eval_partition.txt"
HEADER = "image_name item_id evaluation_status"
COLUMNS = "<image_name> <item_id> <evaluation_status>"
STATUSES = ("train", "query", "gallery")
ITEM_ID = re.compile(r"id_(\d+)")


def load_inshop(root: str | Path) -> Splits:
    """Train items / query and gallery images of the test items, as listed in the partition file."""
    root = require_root(root)
    parts = read_partition(root)
    require_dir(root, "img")
    for status in STATUSES:
        require_nonempty(parts[status], status, f"{root}/{PARTITION}")
    query, gallery = parts["query"], parts["gallery"]
    test_space = query + gallery
    return Splits(
        train=build_records(root, parts["train"]),
        test=build_records(root, test_space),
        query=build_records(root, query, label_space=test_space),
        gallery=build_records(root, gallery, label_space=test_space),
        recall_ks=RECALL_KS["inshop"],
    )


def read_partition(root: Path) -> dict[str, list[Entry]]:
    """``{"train"|"query"|"gallery": [(path, item number, item id)]}`` from the partition file."""
    lines = read_lines(root, PARTITION)
    if len(lines) < 2:
        raise DatasetError(f"{PARTITION} under {root} is truncated (needs a count line and a header)")
    count = parse_int(PARTITION, lines[0][0], lines[0][1], lines[0][1], "<number of images>")
    if lines[1][1].split() != HEADER.split():
        raise DatasetError(f"{PARTITION} line {lines[1][0]}: expected header '{HEADER}', got {lines[1][1]!r}")
    parts: dict[str, list[Entry]] = {status: [] for status in STATUSES}
    for number, line in lines[2:]:
        path, item, status = split_fields(PARTITION, number, line, COLUMNS)
        match = ITEM_ID.fullmatch(item)
        if match is None or status not in parts:
            raise DatasetError(
                f"{PARTITION} line {number}: malformed, expected '{COLUMNS}' with item_id like "
                f"'id_00000002' and status one of {list(STATUSES)}, got {line!r}"
            )
        parts[status].append((path, int(match.group(1)), item))
    listed = sum(len(entries) for entries in parts.values())
    if listed != count:
        raise DatasetError(f"{PARTITION} under {root} declares {count} images on line 1 but lists {listed}")
    return parts
