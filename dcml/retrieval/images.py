"""What ``dcml embed`` embeds: a listing of image files with optional class labels.

Three sources, one :class:`Listing`:

- a folder: every image file below it, in sorted path order; a file inside a sub-folder
  gets that top-level sub-folder's name as its label (``root/<class>/...``), a file
  directly in the folder gets none;
- a list file (text): one image path per line, optionally ``<TAB>label``; relative paths
  are relative to the list file's folder; blank lines and lines starting with ``#`` are
  skipped;
- a dataset split (:func:`split_listing`): the records of a model's own dataset, in the
  pipeline's order, labelled with their class names.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from dcml.data.folder import IMAGE_EXTENSIONS, to_rgb
from dcml.data.records import ImageRecords
from dcml.retrieval import RetrievalError


@dataclass(frozen=True)
class Listing:
    """``paths[i]`` with ``labels[i]`` (a class name, or ``None``); ``source`` says where from."""

    paths: tuple[str, ...]
    labels: tuple[str | None, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError("a listing needs one label (or None) per path")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return any(label is not None for label in self.labels)


def list_images(images: str | Path) -> Listing:
    """The :class:`Listing` of a folder or a list file (see the module docstring)."""
    path = Path(images)
    if path.is_dir():
        return _folder_listing(path)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return Listing((str(path),), (None,), str(path))
        return _list_file_listing(path)
    raise RetrievalError(f"image folder or list file not found: {images}")


def _folder_listing(root: Path) -> Listing:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p, root)),
        key=lambda p: p.relative_to(root).parts,
    )
    if not files:
        raise RetrievalError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    labels = tuple(p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in files)
    return Listing(tuple(str(p) for p in files), labels, str(root))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_file_listing(list_file: Path) -> Listing:
    try:
        lines = list_file.read_text().splitlines()
    except UnicodeDecodeError:
        raise RetrievalError(
            f"{list_file} is neither an image folder, an image file nor a text list of images"
        ) from None
    paths, labels = [], []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.rstrip("\n").partition("\t")
        path = Path(name.strip())
        paths.append(str(path if path.is_absolute() else list_file.parent / path))
        labels.append(label.strip() or None)
    if not paths:
        raise RetrievalError(f"list file {list_file} names no images")
    return Listing(tuple(paths), tuple(labels), str(list_file))


def split_listing(records: ImageRecords, source: str) -> Listing:
    """A dataset split's records in their order, labelled with class names."""
    names = tuple(records.class_names[int(label)] for label in records.labels)
    return Listing(tuple(records.paths), names, source)


class HashedImageDataset(Dataset):
    """``(image, index, sha256, error)`` per listed path, for ``indices`` of the listing.

    The file is read once: its bytes are hashed (SHA-256 of the content) and decoded
    (:func:`dcml.data.folder.load_image`'s conversion to RGB). A file that cannot be read
    or decoded yields a zero image, an empty hash and the error text instead of raising.
    """

    def __init__(self, paths: tuple[str, ...], indices: range, transform: Callable[[Image.Image], torch.Tensor], shape):
        self.paths, self.indices, self.transform, self.shape = paths, indices, transform, shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, str, str]:
        index = self.indices[position]
        try:
            data = Path(self.paths[index]).read_bytes()
            with Image.open(io.BytesIO(data)) as decoded:
                decoded.load()  # truncation is caught here
                image = to_rgb(decoded)
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported, not fatal
            return torch.zeros(self.shape), index, "", f"{type(error).__name__}: {error}".replace("\n", " ")
        return self.transform(image), index, hashlib.sha256(data).hexdigest(), ""
