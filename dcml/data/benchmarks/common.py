"""Helpers shared by the benchmark loaders: layout checks, text parsing, label remapping.

Label remapping happens here, once, for every benchmark (see ``docs/datasets.md``):
each split gets contiguous labels ``0..C-1`` assigned in ascending order of the
dataset's *original numeric* class id, and ``class_names[label]`` keeps the original
identifier (CUB folder name, CARS class name, SOP class id, In-shop item id, VehicleID id).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from dcml.data.errors import DatasetError
from dcml.data.records import ImageRecords

#: ``(path relative to the dataset root, original numeric class id, class name)``
Entry = tuple[str, int, str]

#: The customary recall@k list of each benchmark.
RECALL_KS: dict[str, tuple[int, ...]] = {
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
    "vehicleid": (1, 5),
}


def require_root(root: str | Path) -> Path:
    """The dataset root as a :class:`Path`; :class:`DatasetError` if it is not a folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    return root


def require_file(root: Path, relpath: str) -> Path:
    """``root/relpath`` if it is a file, else ``DatasetError("<relpath> not found under <root>")``."""
    path = root / relpath
    if not path.is_file():
        raise DatasetError(f"{relpath} not found under {root}")
    return path


def require_dir(root: Path, relpath: str) -> Path:
    """``root/relpath`` if it is a folder, else ``DatasetError("<relpath>/ not found under <root>")``."""
    path = root / relpath
    if not path.is_dir():
        raise DatasetError(f"{relpath}/ (image folder) not found under {root}")
    return path


def read_lines(root: Path, relpath: str) -> list[tuple[int, str]]:
    """Non-blank lines of a required text file as ``(1-based line number, stripped text)``."""
    path = require_file(root, relpath)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{relpath} under {root} cannot be read: {error}") from error
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def split_fields(relpath: str, number: int, line: str, expected: str, maxsplit: int = -1) -> list[str]:
    """Whitespace-split ``line``; it must have as many fields as ``expected`` names.

    ``expected`` is the column description, e.g. ``"<image_id> <path>"``, used in the
    message ``"images.txt line 17: malformed, expected '<image_id> <path>', got '...'"``.
    """
    count = len(expected.split())
    fields = line.split(None, maxsplit) if maxsplit >= 0 else line.split()
    if len(fields) != count:
        raise malformed(relpath, number, line, expected)
    return fields


def parse_int(relpath: str, number: int, line: str, token: str, expected: str) -> int:
    """``int(token)`` or the "malformed" :class:`DatasetError` for that line."""
    try:
        return int(token)
    except ValueError:
        raise malformed(relpath, number, line, expected) from None


def malformed(relpath: str, number: int, line: str, expected: str) -> DatasetError:
    """The error for a line that does not follow the file's official format."""
    return DatasetError(f"{relpath} line {number}: malformed, expected '{expected}', got {line!r}")


def build_records(root: Path, entries: Sequence[Entry], label_space: Iterable[Entry] | None = None) -> ImageRecords:
    """Records of one split with labels ``0..C-1`` in ascending original class id.

    ``label_space`` (default: ``entries``) fixes the classes; In-shop passes query and
    gallery together so that the same item gets the same label in both.
    Paths become ``root / relative path``.
    """
    names: dict[int, str] = {}
    for _, class_id, name in entries if label_space is None else label_space:
        names.setdefault(class_id, name)
    class_ids = sorted(names)
    index = {class_id: label for label, class_id in enumerate(class_ids)}
    paths = tuple(str(root / relpath) for relpath, _, _ in entries)
    labels = np.fromiter((index[class_id] for _, class_id, _ in entries), dtype=np.int64, count=len(entries))
    return ImageRecords(paths=paths, labels=labels, class_names=tuple(names[c] for c in class_ids))


def split_by_class_id(entries: Sequence[Entry], last_train_id: int) -> tuple[list[Entry], list[Entry]]:
    """Zero-shot split: classes ``<= last_train_id`` train, the others test."""
    train = [entry for entry in entries if entry[1] <= last_train_id]
    test = [entry for entry in entries if entry[1] > last_train_id]
    return train, test


def require_nonempty(entries: Sequence[Entry], what: str, source: str) -> None:
    """:class:`DatasetError` if a split came out empty (wrong or truncated metadata)."""
    if not entries:
        raise DatasetError(f"no {what} images listed in {source}")
