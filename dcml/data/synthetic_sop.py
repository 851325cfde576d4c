"""A synthetic stand-in for Stanford Online Products at SOP's scale, in SOP's official layout.

For scale rehearsals on CPU: the same files as the real archive (``Ebay_train.txt``,
``Ebay_test.txt`` with header ``image_id class_id super_class_id path`` and 1-based
ids; ``<category>_final/<class_id>_<n>.JPG``), the same 12 super-categories and, at
``scale=1``, the same totals: train 11,318 classes / 59,551 images (class ids
1..11318), test 11,316 classes / 60,502 images (class ids 11319..22634). Class ids are
contiguous per category (as in SOP), the 12 categories taking equal blocks of each split.

SOP's real per-class image counts are not available here, so they are drawn: 2 + a
binomial over 10 trials whose mean matches SOP's images per class, then adjusted by
single images (never outside [2, 12], SOP's range) until each split's total is exact.
``scale`` shrinks the class counts (and totals, keeping the mean) proportionally.

Images are tiny RGB JPEGs (default 32 px). Each super-category has one shape family
(ellipse, box, ring, triangle, ...); each class draws its colours, aspect, rotation and
pattern frequency; each image adds nuisance: offset, scale and rotation jitter,
brightness, a background gradient and pixel noise. Everything comes from
``np.random.default_rng([seed, class_id])``, so the output is byte-identical for a seed
(same numpy/Pillow builds), whatever the number of worker processes. Generation writes a
sibling temp folder renamed into place, with a ``.complete`` marker holding the settings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcml.data.errors import DatasetError
from dcml.data.generated import write_generated

GENERATOR_VERSION = 2
CATEGORIES = (
    "bicycle cabinet chair coffee_maker fan kettle lamp mug sofa stapler table toaster".split()
)  # super_class_id = position + 1, as in SOP
SOP_TOTALS = {"train": (11318, 59551), "test": (11316, 60502)}  # (classes, images)
MIN_IMAGES, MAX_IMAGES = 2, 12
HEADER = "image_id class_id super_class_id path"
_CHUNK_CLASSES = 256


@dataclass(frozen=True)
class SopLikeInfo:
    root: str
    scale: float
    image_size: int
    seed: int
    train_classes: int
    train_images: int
    test_classes: int
    test_images: int
    generated: bool  # False: a complete folder with these settings was already there
    seconds: float


def split_sizes(scale: float = 1.0) -> dict[str, tuple[int, int]]:
    """``{"train"|"test": (classes, images)}``: SOP's totals at ``scale`` (0 < scale <= 1)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    sizes = {}
    for split, (classes, images) in SOP_TOTALS.items():
        num_classes = max(2, round(classes * scale))
        sizes[split] = (num_classes, round(images * num_classes / classes))
    return sizes


def class_image_counts(num_classes: int, num_images: int, rng: np.random.Generator) -> np.ndarray:
    """(num_classes,) int64 image counts in [2, 12] summing exactly to ``num_images``."""
    if not MIN_IMAGES * num_classes <= num_images <= MAX_IMAGES * num_classes:
        raise ValueError(f"{num_images} images cannot fill {num_classes} classes of {MIN_IMAGES}-{MAX_IMAGES}")
    p = (num_images / num_classes - MIN_IMAGES) / (MAX_IMAGES - MIN_IMAGES)
    counts = MIN_IMAGES + rng.binomial(MAX_IMAGES - MIN_IMAGES, p, size=num_classes).astype(np.int64)
    missing = num_images - int(counts.sum())
    while missing:
        step = 1 if missing > 0 else -1
        room = np.flatnonzero(counts < MAX_IMAGES if step > 0 else counts > MIN_IMAGES)
        chosen = rng.choice(room, size=min(abs(missing), len(room)), replace=False)
        counts[chosen] += step
        missing -= step * len(chosen)
    return counts


def sop_like_classes(scale: float = 1.0, seed: int = 0) -> dict[str, list[tuple[int, int, int]]]:
    """``{split: [(class_id, super_class_id, num_images), ...]}`` in class-id order (pure)."""
    classes, first_id = {}, 1
    for index, (split, (num_classes, num_images)) in enumerate(split_sizes(scale).items()):
        counts = class_image_counts(num_classes, num_images, np.random.default_rng([seed, 7919, index]))
        supers = np.arange(num_classes) * len(CATEGORIES) // num_classes + 1  # contiguous blocks
        classes[split] = [(first_id + i, int(supers[i]), int(counts[i])) for i in range(num_classes)]
        first_id += num_classes
    return classes


def _image_path(class_id: int, super_id: int, n: int) -> str:
    return f"{CATEGORIES[super_id - 1]}_final/{class_id}_{n}.JPG"


_SHAPES = (  # one family per super-category; (u, v) object coordinates, f pattern frequency
    lambda u, v, f: u * u + v * v < 1,
    lambda u, v, f: (abs(u) < 1) & (abs(v) < 0.8),
    lambda u, v, f: (u * u + v * v < 1) & (u * u + v * v > 0.4),
    lambda u, v, f: (v < 0.8) & (v > 2 * abs(u) - 1),
    lambda u, v, f: abs(u) + abs(v) < 1,
    lambda u, v, f: ((abs(u) < 0.35) & (abs(v) < 1)) | ((abs(v) < 0.35) & (abs(u) < 1)),
    lambda u, v, f: (u * u + v * v < 1) & (np.sin(f * u) > 0),
    lambda u, v, f: (abs(u) < 1) & (abs(v) < 1) & (np.sin(f * u) * np.sin(f * v) > 0),
    lambda u, v, f: (u * u + v * v < 1) & (v > 0),
    lambda u, v, f: (abs(u) < 1) & (abs(v) < 0.3),
    lambda u, v, f: np.hypot(u, v) < 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u)),
    lambda u, v, f: ((u - 0.5) ** 2 + v * v < 0.2) | ((u + 0.5) ** 2 + v * v < 0.2),
)


def render_class(super_id: int, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(count, size, size, 3) uint8: ``count`` images sharing one class appearance."""
    foreground, background = rng.uniform(0, 255, (2, 3))
    if np.abs(foreground - background).sum() < 150:  # keep the object visible
        foreground = np.where(background < 128, 230.0, 25.0)
    scale, aspect, angle, frequency = rng.uniform((0.45, 0.6, 0, 4), (0.7, 1, np.pi, 9))
    shift = rng.uniform(-0.15, 0.15, (count, 2, 1, 1))  # per-image nuisance from here on
    zoom = scale * rng.uniform(0.9, 1.1, (count, 1, 1))
    turn = angle + rng.uniform(-0.25, 0.25, (count, 1, 1))
    gain = rng.uniform(0.85, 1.15, (count, 1, 1, 1))
    gradient = rng.normal(0, 20, (count, 2, 1, 1))
    noise = rng.normal(0, 6, (count, size, size, 3))
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    dx, dy = x - shift[:, 0], y - shift[:, 1]
    u = (dx * np.cos(turn) + dy * np.sin(turn)) / (zoom * aspect)
    v = (-dx * np.sin(turn) + dy * np.cos(turn)) / zoom
    mask = _SHAPES[super_id - 1](u, v, frequency)[..., None]
    shade = (gradient[:, 0] * x + gradient[:, 1] * y)[..., None]
    pixels = np.where(mask, foreground, background + shade) * gain + noise
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def _write_classes(job: tuple[str, int, int, list[tuple[int, int, int]]]) -> int:
    """Worker: write the images of a chunk of classes; returns how many."""
    folder, size, seed, classes = job
    for class_id, super_id, count in classes:
        pixels = render_class(super_id, count, size, np.random.default_rng([seed, class_id]))
        for n in range(count):
            Image.fromarray(pixels[n]).save(Path(folder) / _image_path(class_id, super_id, n), "JPEG", quality=90)
    return sum(count for _, _, count in classes)


def _write_lists(folder: Path, classes: dict[str, list[tuple[int, int, int]]]) -> None:
    for split, rows in classes.items():
        paths = [(c, s, _image_path(c, s, n)) for c, s, count in rows for n in range(count)]
        lines = [f"{i} {c} {s} {path}\n" for i, (c, s, path) in enumerate(paths, 1)]
        (folder / f"Ebay_{split}.txt").write_text(HEADER + "\n" + "".join(lines))


def _write_images(folder: Path, classes: list[tuple[int, int, int]], size: int, seed: int, workers: int) -> None:
    for category in CATEGORIES:
        (folder / f"{category}_final").mkdir()
    jobs = [(str(folder), size, seed, classes[i : i + _CHUNK_CLASSES]) for i in range(0, len(classes), _CHUNK_CLASSES)]
    if workers <= 1:
        for job in jobs:
            _write_classes(job)
        return
    # fork: workers need no re-import (dcml.data pulls in torch); they only use numpy/PIL
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_classes, jobs):
            pass


def generate_sop_like(
    root: str | Path, *, scale: float = 1.0, image_size: int = 32, seed: int = 0, workers: int | None = None
) -> SopLikeInfo:
    """Write the SOP-like dataset to ``root`` unless a complete one with these settings is there.

    ``workers`` processes render the images (default: all CPUs). Raises
    :class:`DatasetError` if ``root`` holds anything else; an empty folder is replaced.
    """
    if image_size < 16:
        raise DatasetError(f"SOP-like dataset {root}: need image_size >= 16, got {image_size}")
    root, started = Path(root), time.perf_counter()
    settings = {"version": GENERATOR_VERSION, "scale": float(scale), "image_size": image_size, "seed": seed}
    classes = sop_like_classes(scale, seed)

    def write(folder: Path) -> None:
        _write_lists(folder, classes)
        _write_images(folder, classes["train"] + classes["test"], image_size, seed, workers or os.cpu_count() or 1)

    generated = write_generated(root, settings, "SOP-like dataset", write)
    counts = {split: (len(rows), sum(c for _, _, c in rows)) for split, rows in classes.items()}
    return SopLikeInfo(
        root=str(root),
        scale=float(scale),
        image_size=image_size,
        seed=seed,
        train_classes=counts["train"][0],
        train_images=counts["train"][1],
        test_classes=counts["test"][0],
        test_images=counts["test"][1],
        generated=generated,
        seconds=round(time.perf_counter() - started, 2),
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m dcml.data.synthetic_sop --root DIR [--image-size 32] [--scale 1.0] [--seed 0]``."""
    parser = argparse.ArgumentParser(description="Generate a synthetic dataset in SOP's layout and size.")
    parser.add_argument("--root", required=True, help="output folder (created; reused if complete)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SOP's classes (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="processes rendering images (default: all CPUs)")
    args = parser.parse_args(argv)
    info = generate_sop_like(
        args.root, scale=args.scale, image_size=args.image_size, seed=args.seed, workers=args.workers
    )
    print(json.dumps(asdict(info), indent=2))


if __name__ == "__main__":
    main()
