"""PKU VehicleID (Liu et al. 2016) in its official layout, one test size at a time.

Layout (``VehicleID_V1.0``)::

    root/image/<image_name>.jpg
    root/train_test_split/train_list.txt       "<image_name> <vehicle_id>" per line
    root/train_test_split/test_list_800.txt    (small), test_list_1600.txt (medium),
    root/train_test_split/test_list_2400.txt   (large)

13,164 training vehicle ids; the test lists hold 800, 1,600 and 2,400 ids. As in the
authors' D&C code, R@k is computed over the whole chosen test list (every image is a
query against all the others, like SOP), not with a one-image-per-id gallery.
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
    split_fields,
)
from dcml.data.records import Splits

TEST_SIZES = (800, 1600, 2400)
COLUMNS = "<image_name> <vehicle_id>"


def load_vehicleid(root: str | Path, test_size: int = 800) -> Splits:
    """Train from ``train_list.txt``, test from ``test_list_<test_size>.txt``."""
    if test_size not in TEST_SIZES:
        raise ValueError(f"VehicleID test_size must be one of {list(TEST_SIZES)}, got {test_size!r}")
    root = require_root(root)
    require_dir(root, "image")
    train = read_list(root, "train_test_split/train_list.txt")
    test = read_list(root, f"train_test_split/test_list_{test_size}.txt")
    return Splits(train=build_records(root, train), test=build_records(root, test), recall_ks=RECALL_KS["vehicleid"])


def read_list(root: Path, relpath: str) -> list[Entry]:
    """``(image/<name>.jpg, vehicle id, vehicle id as written)`` for each line of a list file."""
    entries: list[Entry] = []
    for number, line in read_lines(root, relpath):
        name, vehicle = split_fields(relpath, number, line, COLUMNS)
        vehicle_id = parse_int(relpath, number, line, vehicle, COLUMNS)
        entries.append((f"image/{name}.jpg", vehicle_id, vehicle))
    require_nonempty(entries, "vehicle", f"{root}/{relpath}")
    return entries
