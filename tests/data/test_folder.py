from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcml.data.errors import DatasetError
from dcml.data.folder import (
    ImageDataset,
    drop_unreadable,
    find_unreadable,
    load_image,
    scan_class_folder,
    split_by_classes,
)
from dcml.data.transforms import eval_transform, train_transform


def _write_png(path: Path, value: int = 100, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value // 2, 255 - value)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """6 classes x 3 PNGs, plus files and folders the scan must ignore."""
    root = tmp_path / "ds"
    for c in range(6):
        for i in range(3):
            _write_png(root / f"class{c}" / f"{i:02d}.png", value=40 * c + i)
    (root / "class0" / "notes.txt").write_text("not an image")
    _write_png(root / "class0" / ".hidden.png")
    _write_png(root / ".cache" / "x.png")
    _write_png(root / "stray.png")
    (root / "emptyclass").mkdir()
    return root


def test_scan_sorted_images_only(folder: Path) -> None:
    records = scan_class_folder(folder)
    assert records.class_names == tuple(f"class{c}" for c in range(6))
    assert len(records) == 18
    assert list(records.labels) == [c for c in range(6) for _ in range(3)]
    assert records.paths[0] == str(folder / "class0" / "00.png")
    assert all(p.endswith(".png") and "/." not in p for p in records.paths)


def test_scan_missing_and_empty_roots_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found: .*nowhere"):
        scan_class_folder(tmp_path / "nowhere")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match=f"no class folders with images under {tmp_path / 'empty'}"):
        scan_class_folder(tmp_path / "empty")


@pytest.mark.parametrize(("ratio", "num_train"), [(0.5, 3), (0.01, 1), (0.99, 5), (0.75, 5)])
def test_split_by_ratio_is_class_disjoint(folder: Path, ratio: float, num_train: int) -> None:
    splits = split_by_classes(scan_class_folder(folder), train_ratio=ratio)
    assert splits.train.class_names == tuple(f"class{c}" for c in range(num_train))
    assert splits.test.class_names == tuple(f"class{c}" for c in range(num_train, 6))
    assert not set(splits.train.paths) & set(splits.test.paths)
    assert len(splits.train) + len(splits.test) == 18
    for part in (splits.train, splits.test):
        assert set(part.labels) == set(range(part.num_classes))
        for path, label in zip(part.paths, part.labels, strict=True):
            assert Path(path).parent.name == part.class_names[label]


def test_split_by_explicit_lists(folder: Path) -> None:
    records = scan_class_folder(folder)
    splits = split_by_classes(records, train_classes=["class4", "class1"], test_classes=["class2"])
    assert splits.train.class_names == ("class1", "class4")
    assert splits.test.class_names == ("class2",)
    assert list(splits.train.labels) == [0, 0, 0, 1, 1, 1]
    assert len(splits.test) == 3


def test_split_rejects_unknown_or_overlapping_classes(folder: Path) -> None:
    records = scan_class_folder(folder)
    with pytest.raises(DatasetError, match="bogus"):
        split_by_classes(records, train_classes=["class0", "bogus"], test_classes=["class1"])
    with pytest.raises(DatasetError, match="class1"):
        split_by_classes(records, train_classes=["class0", "class1"], test_classes=["class1"])
    with pytest.raises(DatasetError):
        split_by_classes(records, train_classes=["class0"])


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_load_image_converts_to_rgb(tmp_path: Path, mode: str) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    Image.new("RGB", (10, 7), (200, 30, 90)).convert(mode if mode != "I;16" else "L").save(path)
    if mode == "I;16":
        Image.fromarray(np.full((7, 10), 65535, dtype=np.uint16)).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 7)
    if mode == "I;16":
        assert np.asarray(image).min() == 255


def test_load_palette_with_transparency_composites_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[3, 3]) == (255, 255, 255)


def test_corrupt_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"definitely not a jpeg")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated, tmp_path / "missing.png"):
        with pytest.raises(DatasetError, match=path.name):
            load_image(path)


def test_find_and_drop_unreadable(folder: Path) -> None:
    (folder / "class2" / "01.png").write_bytes(b"broken")
    for name in ("00.png", "01.png", "02.png"):
        (folder / "class5" / name).write_bytes(b"broken")
    records = scan_class_folder(folder)
    bad = find_unreadable(records.paths)
    assert len(bad) == 4 and bad[0].endswith("class2/01.png")
    assert find_unreadable(records) == bad
    kept, dropped = drop_unreadable(records)
    assert dropped == bad
    assert len(kept) == 14
    assert kept.class_names == tuple(f"class{c}" for c in range(5))  # class5 lost every image
    assert set(kept.labels) == set(range(5))


def test_image_dataset_items(folder: Path) -> None:
    records = scan_class_folder(folder)
    dataset = ImageDataset(records, eval_transform(8, 10))
    image, label, index = dataset[7]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert (label, index) == (2, 7)
    assert len(dataset) == 18
    assert train_transform(8)(load_image(records.paths[0])).shape == (3, 8, 8)


def test_image_dataset_skip_corrupt(folder: Path) -> None:
    (folder / "class3" / "00.png").write_bytes(b"broken")
    dataset = ImageDataset(scan_class_folder(folder), eval_transform(8, 8), skip_corrupt=True)
    assert len(dataset) == 17 and len(dataset.dropped) == 1
    assert all(dataset[i][0].shape == (3, 8, 8) for i in range(len(dataset)))


def test_skipped_files_are_listed_for_the_run(folder: Path, tmp_path: Path) -> None:
    """data.skip_corrupt: the dropped files are named (the flow writes them to
    <run>/skipped_files.txt and logs that file to MLflow)."""
    from dcml.config import DataConfig, SplitConfig
    from dcml.data import build_bundle, load_splits

    broken = folder / "class4" / "01.png"
    broken.write_bytes(b"broken")
    config = DataConfig(dataset="folder", root=str(folder), split=SplitConfig(train_ratio=0.5), skip_corrupt=True)
    bundle = build_bundle(load_splits(config), config)
    assert bundle.skipped == (str(broken),) and bundle.num_skipped == 1
    assert len(bundle.splits.test) == 8
