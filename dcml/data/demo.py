"""A small synthetic dataset whose groups of classes follow different notions of similarity.

Divide and Conquer targets data where one global metric fits badly because different
regions of the data are told apart by different factors. The demo dataset builds that
situation in 112 classes of 64x64 RGB PNGs (``root/<class>/<NNN>.png``), in three groups:

- ``shape-<shape>-x<count>`` (40): 10 shapes (circle, ring, square, triangle, pentagon,
  star, cross, crescent, bar, tee) x 1-4 copies; colour (light grey) and fill fixed.
- ``colour-<hue>-<tone>`` (36): one ellipse blob, 12 hues (30 degrees apart) x 3 tones
  (deep, vivid, pastel); shape and fill fixed.
- ``texture-<pattern>-a<angle>-p<period>`` (36): a disc filled with stripes (4 angles),
  checker, dots, grid or zigzag (2 angles each) x 3 periods (5, 8, 12 px); light-on-dark.

Nuisance factors vary within every class: position, scale, rotation (shapes; a few
degrees for textures), aspect ratio (blob), pattern phase, small colour/period jitter,
a grey background with a random gradient and clutter lines, and pixel noise.

:func:`demo_class_split` gives a zero-shot split that keeps every group on both sides
(a checkerboard over each group's factor grid), since a split of the sorted names would
put whole groups on one side. Images are deterministic: image ``j`` of class ``i`` is
drawn from ``np.random.default_rng([seed, i, j])``. Generation writes a sibling temp
folder and renames it into place, so ``root`` is either absent or complete; a finished
``root`` holds a ``.complete`` marker with the settings and a ``README.md``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dcml.data.demo_render import render_image
from dcml.data.errors import DatasetError
from dcml.data.generated import write_generated

GENERATOR_VERSION = 1
_SHAPES = ("circle", "ring", "square", "triangle", "pentagon", "star", "cross", "crescent", "bar", "tee")
_HUES = tuple("red orange yellow lime green spring cyan azure blue violet magenta rose".split())
_TONES = {"deep": (0.9, 0.55), "vivid": (0.9, 0.95), "pastel": (0.4, 0.95)}  # saturation, value
_PATTERNS = {
    "stripes": (0, 45, 90, 135),
    "checker": (0, 45),
    "dots": (0, 45),
    "grid": (0, 45),
    "zigzag": (0, 90),
}
_PERIODS_PX = (5, 8, 12)  # at 64 px; scaled with image_size
GROUPS = {
    "colour": "36 classes: 12 hues x 3 tones of one ellipse blob; shape and texture fixed",
    "shape": "40 classes: 10 shapes x 1-4 copies; colour (light grey) and fill fixed",
    "texture": "36 classes: pattern (stripes/checker/dots/grid/zigzag) x angle x period in a disc; "
    "colours fixed (light on dark)",
}


@dataclass(frozen=True)
class DemoClass:
    """One class: its name, group and the group-specific factor values."""

    name: str
    group: str
    factors: tuple
    test: bool  # side of the zero-shot split of :func:`demo_class_split`


@dataclass(frozen=True)
class DemoInfo:
    """What :func:`generate_demo_dataset` wrote (or found): sizes, groups, suggested split."""

    root: str
    num_classes: int
    num_images: int
    images_per_class: int
    image_size: int
    seed: int
    groups: dict[str, str]
    train_classes: tuple[str, ...]
    test_classes: tuple[str, ...]


def demo_classes() -> list[DemoClass]:
    """All classes, sorted by name (the label order of a scanned folder)."""
    classes = [
        DemoClass(f"shape-{shape}-x{count}", "shape", (shape, count), bool((s + count) % 2))
        for s, shape in enumerate(_SHAPES)
        for count in range(1, 5)
    ]
    classes += [
        DemoClass(f"colour-{hue}-{tone}", "colour", (h * 30.0, *_TONES[tone]), bool((h + t) % 2))
        for h, hue in enumerate(_HUES)
        for t, tone in enumerate(_TONES)
    ]
    classes += [
        DemoClass(
            f"texture-{pattern}-a{angle:03d}-p{period:02d}",
            "texture",
            (pattern, angle, period),
            bool((a + p) % 2),
        )
        for pattern, angles in _PATTERNS.items()
        for a, angle in enumerate(angles)
        for p, period in enumerate(_PERIODS_PX)
    ]
    return sorted(classes, key=lambda c: c.name)


def demo_class_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train_classes, test_classes)``: 56/56, every group and factor value on both sides."""
    classes = demo_classes()
    return tuple(c.name for c in classes if not c.test), tuple(c.name for c in classes if c.test)


def generate_demo_dataset(
    root: str | Path, *, images_per_class: int = 30, image_size: int = 64, seed: int = 0
) -> DemoInfo:
    """Write the demo dataset to ``root`` unless a complete one with these settings is there.

    Raises :class:`DatasetError` naming ``root`` if it holds anything else (other files,
    or a demo dataset made with other settings); an empty folder is replaced.
    """
    if images_per_class < 1 or image_size < 16:
        raise DatasetError(f"demo dataset {root}: need images_per_class >= 1 and image_size >= 16")
    root = Path(root)
    settings = {
        "version": GENERATOR_VERSION,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    info = _info(root, settings)
    write_generated(root, settings, "demo dataset", lambda folder: _write_all(folder, settings))
    return info


def _info(root: Path, settings: dict) -> DemoInfo:
    train, test = demo_class_split()
    num_classes = len(train) + len(test)
    return DemoInfo(
        root=str(root),
        num_classes=num_classes,
        num_images=num_classes * settings["images_per_class"],
        images_per_class=settings["images_per_class"],
        image_size=settings["image_size"],
        seed=settings["seed"],
        groups=dict(GROUPS),
        train_classes=train,
        test_classes=test,
    )


def _write_all(folder: Path, settings: dict) -> None:
    count, size, seed = settings["images_per_class"], settings["image_size"], settings["seed"]
    width = max(3, len(str(count - 1)))
    for class_index, spec in enumerate(demo_classes()):
        (folder / spec.name).mkdir()
        for image_index in range(count):
            rng = np.random.default_rng([seed, class_index, image_index])
            pixels = render_image(spec.group, spec.factors, size, rng)
            Image.fromarray(pixels).save(folder / spec.name / f"{image_index:0{width}d}.png", compress_level=6)
    (folder / "README.md").write_text(_readme(settings))


def _readme(settings: dict) -> str:
    train, test = demo_class_split()
    groups = "\n".join(f"- `{name}`: {text}" for name, text in GROUPS.items())
    return (
        f"# dcml demo dataset\n\nGenerated by `dcml.data.demo` with {json.dumps(settings)}.\n\n"
        f"{__doc__ or ''}\n## Groups\n{groups}\n\n## Zero-shot split\n"
        f"train ({len(train)}): {', '.join(train)}\n\ntest ({len(test)}): {', '.join(test)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m dcml.data.demo ROOT [--images-per-class N] [--image-size S] [--seed S]``."""
    parser = argparse.ArgumentParser(description="Generate the dcml demo dataset.")
    parser.add_argument("root")
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = generate_demo_dataset(
        args.root, images_per_class=args.images_per_class, image_size=args.image_size, seed=args.seed
    )
    print(
        f"{info.root}: {info.num_classes} classes, {info.num_images} images "
        f"({info.image_size}x{info.image_size}, seed {info.seed})"
    )
    for name, text in info.groups.items():
        print(f"  {name}: {text}")


if __name__ == "__main__":
    main()
