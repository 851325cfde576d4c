from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcml.data.demo import demo_class_split, demo_classes, generate_demo_dataset, main
from dcml.data.errors import DatasetError
from dcml.data.folder import scan_class_folder, split_by_classes


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo_dataset(root, images_per_class=2, image_size=64, seed=0)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_layout_and_image_format(demo_root: Path) -> None:
    records = scan_class_folder(demo_root)
    assert records.num_classes == len(demo_classes()) == 112
    assert len(records) == 224
    assert np.bincount(records.labels).tolist() == [2] * 112
    assert Path(records.paths[0]).name == "000.png"
    for path in records.paths[::37]:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
    assert (demo_root / "README.md").is_file() and (demo_root / ".complete").is_file()
    assert not list(demo_root.parent.glob("*.tmp-*"))


def test_same_seed_is_byte_identical_and_other_seed_differs(demo_root: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    generate_demo_dataset(twin, images_per_class=2, image_size=64, seed=0)
    assert _files(twin) == _files(demo_root)
    other = tmp_path / "other"
    generate_demo_dataset(other, images_per_class=1, image_size=32, seed=1)
    first = "colour-azure-deep/000.png"
    assert (other / first).read_bytes() != (demo_root / first).read_bytes()


def test_rerun_is_idempotent(demo_root: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*")}
    info = generate_demo_dataset(demo_root, images_per_class=2, image_size=64, seed=0)
    assert {p: p.stat().st_mtime_ns for p in demo_root.rglob("*")} == before
    assert (info.num_classes, info.num_images, info.root) == (112, 224, str(demo_root))
    assert set(info.groups) == {"shape", "colour", "texture"}


def test_refuses_other_settings_and_foreign_data(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=str(demo_root)):
        generate_demo_dataset(demo_root, images_per_class=3, image_size=64, seed=0)
    foreign = tmp_path / "foreign"
    (foreign / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="foreign"):
        generate_demo_dataset(foreign, images_per_class=1, image_size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_demo_dataset(empty, images_per_class=1, image_size=32).num_images == 112


def test_split_keeps_every_group_and_factor_on_both_sides(demo_root: Path) -> None:
    train, test = demo_class_split()
    assert len(train) == len(test) == 56 and not set(train) & set(test)
    for group in ("shape", "colour", "texture"):
        assert any(n.startswith(group) for n in train) and any(n.startswith(group) for n in test)
    for shape in ("circle", "star", "tee"):
        assert any(f"-{shape}-" in n for n in train) and any(f"-{shape}-" in n for n in test)
    splits = split_by_classes(scan_class_folder(demo_root), train_classes=train, test_classes=test)
    assert len(splits.train) == len(splits.test) == 112


def test_main_prints_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "cli"), "--images-per-class", "1", "--image-size", "16", "--seed", "2"])
    assert "112 classes, 112 images" in capsys.readouterr().out
