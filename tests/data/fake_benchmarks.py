"""Miniature copies of the five benchmarks in their exact official layouts and file formats.

Each ``make_<name>(root)`` writes tiny 8x8 JPEGs plus the official metadata files (same
columns, header lines and 1-based ids as the real archives) and returns the counts a
loader must find. Class ids mirror the real id ranges proportionally, so the
split-by-class-id logic is exercised, and some files list classes out of numeric
order (and across 9 -> 10) so the label remapping is too.
"""

from __future__ import annotations

import io
import random
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image


@cache
def jpeg_bytes() -> bytes:
    """One tiny valid JPEG, encoded once and written everywhere (fast)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes())


def make_cub200(root: Path, images_per_class: int = 2, labels_file: bool = True) -> dict[str, Any]:
    """CUB_200_2011: 200 classes; classes 1-100 train, 101-200 test."""
    classes = [f"{c:03d}.Bird_{c}" for c in range(1, 201)]
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c} {name}\n" for c, name in enumerate(classes, 1)))
    images, labels, split = [], [], []
    image_id = 0
    for class_id, name in enumerate(classes, 1):
        for k in range(images_per_class):
            image_id += 1
            relpath = f"{name}/{name[4:]}_{k + 1:04d}_{100000 + image_id}.jpg"
            write_jpeg(root / "images" / relpath)
            images.append(f"{image_id} {relpath}\n")
            labels.append(f"{image_id} {class_id}\n")
            split.append(f"{image_id} {k % 2}\n")  # classification split: must be ignored
    (root / "images.txt").write_text("".join(images))
    (root / "train_test_split.txt").write_text("".join(split))
    if labels_file:
        (root / "image_class_labels.txt").write_text("".join(labels))
    half = 100 * images_per_class
    return {"train": (half, 100), "test": (half, 100)}


def make_cars196(root: Path, images_per_class: int = 2) -> dict[str, Any]:
    """CARS196: car_ims/ and cars_annos.mat (struct array ``annotations``, cell ``class_names``)."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    count = 196 * images_per_class
    annotations = np.zeros((1, count), dtype=[(name, object) for name in fields])
    for index in range(count):
        class_id, relpath = index // images_per_class + 1, f"car_ims/{index + 1:06d}.jpg"
        write_jpeg(root / relpath)
        record = annotations[0, index]
        record["relative_im_path"] = np.array([relpath])
        for name, value in zip(fields[1:5], (1, 2, 7, 6), strict=True):
            record[name] = np.array([[value]], dtype=np.uint16)
        record["class"] = np.array([[class_id]], dtype=np.uint8)
        record["test"] = np.array([[index % 2]], dtype=np.uint8)  # classification split: ignored
    class_names = np.empty((1, 196), dtype=object)
    for c in range(196):
        class_names[0, c] = np.array([f"Make Model {c + 1} 2012"])
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    half = 98 * images_per_class
    return {"train": (half, 98), "test": (half, 98)}


SOP_CATEGORIES = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle"]


def make_sop(root: Path, seed: int = 0) -> dict[str, Any]:
    """SOP: train class ids 1-12, test class ids 13-24 (disjoint ranges), 2-3 images per class."""
    rng = random.Random(seed)
    counts = {}
    for filename, class_ids in (("Ebay_train.txt", range(1, 13)), ("Ebay_test.txt", range(13, 25))):
        rows = []
        for class_id in class_ids:
            super_id = (class_id - 1) % len(SOP_CATEGORIES) + 1
            for k in range(2 + class_id % 2):
                relpath = f"{SOP_CATEGORIES[super_id - 1]}_final/{111085122800 + class_id}_{k}.JPG"
                write_jpeg(root / relpath)
                rows.append((class_id, super_id, relpath))
        rng.shuffle(rows)  # out of numeric class order on purpose
        lines = [f"{i} {c} {s} {p}\n" for i, (c, s, p) in enumerate(rows, 1)]
        (root / filename).write_text("image_id class_id super_class_id path\n" + "".join(lines))
        counts["train" if "train" in filename else "test"] = (len(rows), len(class_ids))
    return counts


def make_inshop(root: Path) -> dict[str, Any]:
    """In-shop: items 1-20; odd ids train (3 images), even ids test (2 query + 2 gallery)."""
    rows = []
    for item in range(1, 21):
        gender, category = ("WOMEN", "Dresses") if item % 4 < 2 else ("MEN", "Denim")
        statuses = ["train"] * 3 if item % 2 else ["query", "gallery", "query", "gallery"]
        for k, status in enumerate(statuses, 1):
            relpath = f"img/{gender}/{category}/id_{item:08d}/{k:02d}_{k}_front.jpg"
            write_jpeg(root / relpath)
            rows.append(f"{relpath:<60}id_{item:08d}            {status}\n")
    (root / "Eval").mkdir(parents=True)
    header = f"{len(rows)}\nimage_name item_id evaluation_status\n"
    (root / "Eval" / "list_eval_partition.txt").write_text(header + "".join(rows))
    return {"train": (30, 10), "query": (20, 10), "gallery": (20, 10)}


VEHICLEID_TEST_IDS = {800: 4, 1600: 8, 2400: 12}  # 800 : 1600 : 2400 = 1 : 2 : 3


def make_vehicleid(root: Path) -> dict[str, Any]:
    """VehicleID: train ids 1-30; test lists with 4/8/12 ids taken from 31-42 (2-3 images each)."""
    image_number = 0

    def images_of(vehicle: int) -> list[str]:
        nonlocal image_number
        names = []
        for _ in range(2 + vehicle % 2):
            image_number += 1
            names.append(f"{image_number:07d}")
            write_jpeg(root / "image" / f"{image_number:07d}.jpg")
        return names

    split_dir = root / "train_test_split"
    split_dir.mkdir(parents=True)
    counts: dict[str, Any] = {}
    train = [(name, v) for v in range(1, 31) for name in images_of(v)]
    (split_dir / "train_list.txt").write_text("".join(f"{n} {v}\n" for n, v in train))
    counts["train"] = (len(train), 30)
    test_images = {v: images_of(v) for v in range(31, 43)}
    for size, num_ids in VEHICLEID_TEST_IDS.items():
        vehicles = list(range(43 - num_ids, 43))
        rows = [(name, v) for v in vehicles for name in test_images[v]]
        (split_dir / f"test_list_{size}.txt").write_text("".join(f"{n} {v}\n" for n, v in rows))
        counts[f"test_{size}"] = (len(rows), num_ids)
    return counts


MAKERS = {
    "cub200": make_cub200,
    "cars196": make_cars196,
    "sop": make_sop,
    "inshop": make_inshop,
    "vehicleid": make_vehicleid,
}
