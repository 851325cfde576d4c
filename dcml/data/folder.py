"""Class-folder datasets (``root/<class>/<image>``): scanning, class-disjoint splits, loading.

Images are always returned as 8-bit RGB. A file that cannot be decoded raises
:class:`DatasetError` naming it; :func:`drop_unreadable` finds and removes such files up
front when a dataset is known to contain a few broken images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dcml.data.errors import DatasetError
from dcml.data.records import ImageRecords, Splits, records_from_pairs

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def scan_class_folder(root: str | Path) -> ImageRecords:
    """Records of ``root/<class>/<image>``; classes and files in sorted order.

    Only files with an extension in :data:`IMAGE_EXTENSIONS` (any case) count; hidden
    files and folders (leading ``.``) and files directly under ``root`` are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    pairs = [
        (str(image), class_dir.name)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p))
        for image in sorted(class_dir.iterdir())
        if image.is_file() and not _hidden(image) and image.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not pairs:
        raise DatasetError(f"no class folders with images under {root}")
    return records_from_pairs(pairs)


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def split_by_classes(
    records: ImageRecords,
    *,
    train_ratio: float = 0.5,
    train_classes: Sequence[str] = (),
    test_classes: Sequence[str] = (),
) -> Splits:
    """Class-disjoint train/test split; labels re-mapped to ``0..C-1`` within each split.

    With explicit ``train_classes`` and ``test_classes`` (both non-empty, disjoint) those
    are used and classes in neither list are left out. Otherwise the first
    ``round(train_ratio * C)`` (half rounded up) sorted class names are train and the
    rest test, each side keeping at least one class.
    """
    if bool(train_classes) != bool(test_classes):
        raise DatasetError("split_by_classes: give both train_classes and test_classes, or neither")
    if train_classes:
        train_names, test_names = list(train_classes), list(test_classes)
        unknown = sorted(set(train_names + test_names) - set(records.class_names))
        if unknown:
            raise DatasetError(f"unknown class names in the split lists: {unknown}")
        overlap = sorted(set(train_names) & set(test_names))
        if overlap:
            raise DatasetError(f"classes in both train and test lists: {overlap}")
    else:
        if records.num_classes < 2:
            raise DatasetError(f"need >= 2 classes to split, got {list(records.class_names)}")
        num_train = min(max(int(train_ratio * records.num_classes + 0.5), 1), records.num_classes - 1)
        train_names = list(records.class_names[:num_train])
        test_names = list(records.class_names[num_train:])
    return Splits(train=select_classes(records, train_names), test=select_classes(records, test_names))


def select_classes(records: ImageRecords, class_names: Iterable[str]) -> ImageRecords:
    """The images of the named classes, labels re-mapped contiguously (sorted-name order)."""
    wanted = set(class_names)
    keep = np.array([records.class_names[label] in wanted for label in records.labels], dtype=bool)
    return _subset(records, keep)


def _subset(records: ImageRecords, keep: np.ndarray) -> ImageRecords:
    """Images where ``keep`` (n,) bool is true; classes left empty are dropped."""
    kept_labels = records.labels[keep]
    present = np.unique(kept_labels)  # sorted old labels == sorted names
    new_label = np.full(records.num_classes, -1, dtype=np.int64)
    new_label[present] = np.arange(len(present))
    return ImageRecords(
        paths=tuple(p for p, k in zip(records.paths, keep, strict=True) if k),
        labels=new_label[kept_labels],
        class_names=tuple(records.class_names[i] for i in present),
    )


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into 8-bit RGB.

    Grayscale, palette (with or without transparency), alpha (composited on white),
    16-bit and ``I`` (scaled from 0..65535), and CMYK images are converted. Any failure
    to open or decode (missing, corrupt, truncated) raises :class:`DatasetError`
    naming the file.
    """
    try:
        with Image.open(path) as image:
            image.load()  # decode now so truncation is caught here, not in a worker later
            return to_rgb(image)
    except Exception as error:  # any failure to open or decode means a bad file
        raise DatasetError(f"cannot read image {path}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def is_readable(path: str | Path) -> bool:
    """Whether PIL can open and fully decode the file (a truncated JPEG fails ``load``)."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return False
    return True


def find_unreadable(paths: ImageRecords | Iterable[str]) -> list[str]:
    """The paths (in input order) that cannot be decoded."""
    candidates = paths.paths if isinstance(paths, ImageRecords) else paths
    return [str(path) for path in candidates if not is_readable(path)]


def drop_unreadable(records: ImageRecords) -> tuple[ImageRecords, list[str]]:
    """``(records without undecodable images, the dropped paths)``; empty classes are dropped."""
    bad = set(find_unreadable(records.paths))
    if not bad:
        return records, []
    keep = np.array([path not in bad for path in records.paths], dtype=bool)
    return _subset(records, keep), [p for p in records.paths if p in bad]


class ImageDataset(Dataset):
    """Torch dataset over :class:`ImageRecords` yielding ``(image, label, index)``.

    ``image`` is ``transform(rgb PIL image)`` (a float tensor (3, H, W) for the transforms
    of :mod:`dcml.data.transforms`), ``label`` an int, ``index`` the position in
    ``self.records``. With ``skip_corrupt`` undecodable files are removed up front;
    ``self.records`` then holds the kept images and ``self.dropped`` the removed paths.
    """

    def __init__(
        self,
        records: ImageRecords,
        transform: Callable[[Image.Image], torch.Tensor],
        skip_corrupt: bool = False,
    ) -> None:
        self.records, self.dropped = drop_unreadable(records) if skip_corrupt else (records, [])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """``key`` is an index, or ``(index, seed)``: then the random transforms draw from
        torch's generator seeded with ``seed`` (the caller's generator is left as it was),
        so an image's augmentation does not depend on which process loads it."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = load_image(self.records.paths[index])
        if seed is None:
            tensor = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed would also reseed CUDA's (which
                # dropout uses) whenever the image is loaded in an initialised main process
                torch.default_generator.manual_seed(seed)
                tensor = self.transform(image)
        return tensor, int(self.records.labels[index]), int(index)
