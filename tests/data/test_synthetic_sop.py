"""The SOP-like generator: SOP's exact totals, its official layout (read by the real
loader), scaling, per-class counts and byte determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dcml.data.benchmarks import inspect_dataset, load_sop
from dcml.data.errors import DatasetError
from dcml.data.synthetic_sop import (
    CATEGORIES,
    class_image_counts,
    generate_sop_like,
    render_class,
    sop_like_classes,
    split_sizes,
)

SCALE = 0.005  # 57 train / 57 test classes, about 300 images each


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sop-like") / "sop"
    generate_sop_like(root, scale=SCALE, seed=3, workers=1)
    return root


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_full_scale_counts_equal_sops_totals(seed: int) -> None:
    classes = sop_like_classes(1.0, seed)
    for split, classes_images, ids in (
        ("train", (11318, 59551), (1, 11318)),
        ("test", (11316, 60502), (11319, 22634)),
    ):
        rows = classes[split]
        counts = np.array([count for _, _, count in rows])
        assert (len(rows), counts.sum()) == classes_images
        assert [class_id for class_id, _, _ in rows] == list(range(ids[0], ids[1] + 1))
        assert 2 <= counts.min() and counts.max() <= 12
        assert {super_id for _, super_id, _ in rows} == set(range(1, 13))


def test_scale_shrinks_classes_and_images_proportionally() -> None:
    assert split_sizes(1.0) == {"train": (11318, 59551), "test": (11316, 60502)}
    assert split_sizes(0.1) == {"train": (1132, 5956), "test": (1132, 6052)}
    with pytest.raises(ValueError):
        split_sizes(0)


def test_counts_are_exact_at_the_extremes_and_refuse_the_impossible() -> None:
    rng = np.random.default_rng(0)
    assert class_image_counts(5, 10, rng).tolist() == [2] * 5
    assert class_image_counts(5, 60, rng).tolist() == [12] * 5
    counts = class_image_counts(1000, 2100, rng)
    assert counts.sum() == 2100 and counts.min() >= 2 and counts.max() <= 12
    with pytest.raises(ValueError):
        class_image_counts(5, 61, rng)


def test_the_sop_loader_reads_the_output(small_root: Path) -> None:
    expected = sop_like_classes(SCALE, seed=3)
    splits = load_sop(small_root)
    for split, records in (("train", splits.train), ("test", splits.test)):
        rows = expected[split]
        assert records.num_classes == len(rows) == split_sizes(SCALE)[split][0]
        assert len(records) == sum(count for _, _, count in rows)
        assert records.class_names == tuple(str(class_id) for class_id, _, _ in rows)
        assert np.bincount(records.labels).tolist() == [count for _, _, count in rows]
        assert all(Path(path).parent.name in {f"{c}_final" for c in CATEGORIES} for path in records.paths)
    assert not set(splits.train.class_names) & set(splits.test.class_names)
    report = inspect_dataset("sop", small_root)  # decodes every image
    assert report["splits"]["train"]["unreadable"] == report["splits"]["test"]["unreadable"] == 0


def test_same_seed_gives_the_same_bytes_whatever_the_workers(small_root: Path, tmp_path: Path) -> None:
    again = generate_sop_like(tmp_path / "sop", scale=SCALE, seed=3, workers=2)
    assert again.generated
    files = sorted(p.relative_to(small_root) for p in small_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in Path(again.root).rglob("*") if p.is_file())
    assert all((small_root / f).read_bytes() == (Path(again.root) / f).read_bytes() for f in files)


def test_a_complete_folder_is_reused_and_other_settings_refused(small_root: Path) -> None:
    assert not generate_sop_like(small_root, scale=SCALE, seed=3).generated
    with pytest.raises(DatasetError, match="remove it first"):
        generate_sop_like(small_root, scale=SCALE, seed=4)


def test_images_of_a_class_look_alike() -> None:
    """Mean distance between two images of one class is well below that across classes."""
    classes = [render_class(1 + c % 12, 6, 32, np.random.default_rng([0, c])).astype(float) for c in range(40)]
    within = np.mean([np.abs(images[0] - images[1:]).mean() for images in classes])
    across = np.mean([np.abs(classes[c][0] - classes[c + 1][0]).mean() for c in range(39)])
    assert within < 0.5 * across
