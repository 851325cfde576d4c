"""Omniglot's nested archive layout becomes one folder per character."""

import pytest
from PIL import Image

from dcml.data.errors import DatasetError
from dcml.data.folder import scan_class_folder
from dcml.data.omniglot import flatten


def make_set(root, alphabets):
    for alphabet, characters in alphabets.items():
        for c in range(1, characters + 1):
            folder = root / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for drawer in range(1, 4):
                Image.new("1", (20, 20), color=drawer % 2).save(folder / f"{c:04d}_{drawer:02d}.png")


def test_two_sets_flatten_into_one_class_folder_per_character(tmp_path):
    make_set(tmp_path / "small1", {"Greek": 2, "Latin": 3})
    make_set(tmp_path / "small2", {"Korean": 2})
    out = tmp_path / "omniglot"
    assert flatten([tmp_path / "small1", tmp_path / "small2"], out) == 7
    assert flatten([tmp_path / "small1", tmp_path / "small2"], out) == 7  # rerun: idempotent
    records = scan_class_folder(out)
    assert records.num_classes == 7 and len(records.labels) == 21
    assert "Latin__character03" in records.class_names and "Korean__character01" in records.class_names


def test_a_folder_that_is_not_an_omniglot_set_is_named(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="flat"):
        flatten([tmp_path / "flat"], tmp_path / "out")
