"""Benchmark loaders on miniature copies in the official layouts (and on real copies if given)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import yaml

from dcml.config import DataConfig, Params, params_from_dict, to_dict
from dcml.data.benchmarks import (
    BENCHMARKS,
    RECALL_KS,
    inspect_dataset,
    load_benchmark,
    load_vehicleid,
)
from dcml.data.errors import DatasetError
from dcml.data.records import ImageRecords, Splits
from tests.data.fake_benchmarks import MAKERS, VEHICLEID_TEST_IDS

NAMES = sorted(BENCHMARKS)
PRESETS = Path(__file__).resolve().parents[2] / "dcml" / "presets"


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each miniature benchmark built once: ``{name: (root, expected counts)}``."""
    out = {}
    for name, make in MAKERS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, make(root))
    return out


@pytest.fixture
def fresh(built, tmp_path):
    """A private copy of a miniature benchmark that a test may damage."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(built[name][0], tmp_path / name))

    return copy


def named_splits(name: str, root: Path) -> dict[str, ImageRecords]:
    if name == "vehicleid":
        loaded = {size: load_vehicleid(root, test_size=size) for size in VEHICLEID_TEST_IDS}
        return {"train": loaded[800].train, **{f"test_{s}": sp.test for s, sp in loaded.items()}}
    splits = load_benchmark(name, root)
    named = {"train": splits.train, "test": splits.test}
    if splits.query is not None:
        named.update(query=splits.query, gallery=splits.gallery)
    return named


def check_protocol(name: str, splits: Splits) -> None:
    """Invariants of every zero-shot benchmark split."""
    assert splits.recall_ks == RECALL_KS[name]
    for records in (splits.train, splits.test):
        assert records.labels.dtype == np.int64
        assert set(records.labels.tolist()) == set(range(records.num_classes))  # contiguous 0..C-1
        assert len(set(records.class_names)) == records.num_classes
    assert not set(splits.train.class_names) & set(splits.test.class_names)


@pytest.mark.parametrize("name", NAMES)
def test_miniature_counts_labels_and_disjointness(name, built):
    root, expected = built[name]
    named = named_splits(name, root)
    for split, (images, classes) in expected.items():
        assert (len(named[split]), named[split].num_classes) == (images, classes), split
        assert all(Path(p).is_file() for p in named[split].paths)
    sizes = VEHICLEID_TEST_IDS if name == "vehicleid" else [None]
    for size in sizes:
        check_protocol(name, load_benchmark(name, root, **({"test_size": size} if size else {})))


def test_cub_splits_by_class_id_and_ignores_classification_split(built, fresh):
    splits = load_benchmark("cub200", built["cub200"][0])
    assert splits.train.class_names[0] == "001.Bird_1" and splits.train.class_names[-1] == "100.Bird_100"
    assert splits.test.class_names[0] == "101.Bird_101" and splits.test.class_names[-1] == "200.Bird_200"
    root = fresh("cub200")
    (root / "image_class_labels.txt").unlink()  # optional: classes then come from the folder names
    without = load_benchmark("cub200", root)
    assert [Path(p).name for p in without.test.paths] == [Path(p).name for p in splits.test.paths]
    assert np.array_equal(without.test.labels, splits.test.labels)


def test_cars_mat_reads_like_the_real_file(built):
    root = built["cars196"][0]
    mat = scipy.io.loadmat(str(root / "cars_annos.mat"))
    first = mat["annotations"][0][0]  # the real file: annotations is 1 x 16,185
    assert mat["annotations"].shape == (1, 392)
    assert first["relative_im_path"][0] == "car_ims/000001.jpg" and first["class"][0][0] == 1
    assert mat["class_names"][0][0][0] == "Make Model 1 2012"
    splits = load_benchmark("cars196", root)
    assert splits.train.class_names[0] == "Make Model 1 2012"
    assert splits.test.class_names[0] == "Make Model 99 2012"
    assert splits.test.paths[0].endswith("car_ims/000197.jpg") and splits.test.labels[0] == 0


def test_sop_labels_follow_numeric_class_id_not_file_order(built):
    root = built["sop"][0]
    splits = load_benchmark("sop", root)
    assert splits.train.class_names == tuple(str(c) for c in range(1, 13))  # 2 before 10
    rows = [line.split() for line in (root / "Ebay_train.txt").read_text().splitlines()[1:]]
    assert [str(root / row[3]) for row in rows] == list(splits.train.paths)  # file order kept
    assert splits.train.labels.tolist() == [int(row[1]) - 1 for row in rows]


def test_inshop_query_gallery_share_labels(built):
    splits = load_benchmark("inshop", built["inshop"][0])
    query, gallery = splits.query, splits.gallery
    assert query.class_names == gallery.class_names == splits.test.class_names
    assert splits.test.paths == query.paths + gallery.paths
    assert np.array_equal(splits.test.labels, np.concatenate([query.labels, gallery.labels]))
    for records in (query, gallery):  # same item -> same label, item read from the path
        for path, label in zip(records.paths, records.labels, strict=True):
            assert Path(path).parent.name == records.class_names[label]
    assert set(query.labels.tolist()) <= set(gallery.labels.tolist())  # each query has gallery items
    assert not set(splits.train.class_names) & set(query.class_names)


def test_vehicleid_uses_the_chosen_test_list(built):
    root = built["vehicleid"][0]
    for size, num_ids in VEHICLEID_TEST_IDS.items():
        splits = load_vehicleid(root, test_size=size)
        assert splits.test.class_names == tuple(str(v) for v in range(43 - num_ids, 43))
        assert splits.train.num_classes == 30
    with pytest.raises(ValueError, match="800, 1600, 2400"):
        load_vehicleid(root, test_size=1000)


def _drop(relpath: str):
    def mutate(root: Path) -> None:
        target = root / relpath
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return mutate


def _edit_line(relpath: str, number: int, text: str):
    def mutate(root: Path) -> None:
        lines = (root / relpath).read_text().splitlines()
        lines[number - 1] = text
        (root / relpath).write_text("\n".join(lines) + "\n")

    return mutate


BROKEN = [
    ("cub200", _drop("classes.txt"), "classes.txt not found under"),
    ("cub200", _drop("images.txt"), "images.txt not found under"),
    ("cub200", _drop("images"), r"images/ \(image folder\) not found under"),
    ("cub200", _edit_line("images.txt", 17, "17"), "images.txt line 17: malformed"),
    ("cub200", _edit_line("image_class_labels.txt", 3, "3 999"), "class '999', not in classes.txt"),
    ("cars196", _drop("cars_annos.mat"), "cars_annos.mat not found under"),
    ("cars196", _drop("car_ims"), r"car_ims/ \(image folder\) not found under"),
    ("cars196", lambda r: (r / "cars_annos.mat").write_bytes(b"garbage"), "cars_annos.mat cannot be read"),
    ("cars196", lambda r: scipy.io.savemat(str(r / "cars_annos.mat"), {"x": 1}), "no struct array"),
    ("sop", _drop("Ebay_test.txt"), "Ebay_test.txt not found under"),
    ("sop", _edit_line("Ebay_train.txt", 1, "id class path"), "Ebay_train.txt line 1: expected header"),
    ("sop", _edit_line("Ebay_train.txt", 3, "2 x 1 a/b.JPG"), "Ebay_train.txt line 3: malformed"),
    ("sop", _drop("kettle_final"), r"kettle_final/ not found under"),
    ("inshop", _drop("Eval/list_eval_partition.txt"), "Eval/list_eval_partition.txt not found under"),
    ("inshop", _drop("img"), r"img/ \(image folder\) not found under"),
    ("inshop", _edit_line("Eval/list_eval_partition.txt", 5, "img/a.jpg id_1 val"), "line 5: malformed"),
    ("inshop", _edit_line("Eval/list_eval_partition.txt", 1, "7"), "declares 7 images on line 1"),
    ("vehicleid", _drop("train_test_split/test_list_1600.txt"), "test_list_1600.txt not found under"),
    ("vehicleid", _drop("image"), r"image/ \(image folder\) not found under"),
    (
        "vehicleid",
        _edit_line("train_test_split/train_list.txt", 2, "0000002"),
        "train_list.txt line 2: malformed",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "message"), BROKEN)
def test_partial_layouts_fail_clearly(name, mutate, message, fresh):
    root = fresh(name)
    mutate(root)
    with pytest.raises(DatasetError, match=message):
        named_splits(name, root)
    with pytest.raises(DatasetError, match=message):  # before any image is counted
        inspect_dataset(name, root)


def test_unknown_benchmark_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="unknown benchmark 'mnist'"):
        load_benchmark("mnist", tmp_path)
    with pytest.raises(DatasetError, match="dataset root not found"):
        load_benchmark("sop", tmp_path / "nowhere")


@pytest.mark.parametrize("name", NAMES)
def test_inspect_counts_missing_and_unreadable(name, built, fresh):
    root = fresh(name)
    named = named_splits(name, root)
    train, last = named["train"].paths, named[list(named)[-1]].paths
    Path(train[0]).unlink()
    Path(train[1]).write_bytes(b"not a jpeg")
    Path(last[-1]).write_bytes(Path(last[-1]).read_bytes()[:60])  # truncated JPEG
    assert len(named_splits(name, root)["train"]) == len(train)  # missing files load fine
    report = inspect_dataset(name, root)
    json.dumps(report)
    assert report["dataset"] == name and report["root"] == str(root)
    expected = built[name][1]
    assert sorted(report["splits"]) == sorted(expected)
    for split, (images, classes) in expected.items():
        summary = report["splits"][split]
        assert (summary["images"], summary["classes"]) == (images, classes)
        assert summary.get("classes_shared_with_train", 0) == 0
    train_summary, last_summary = report["splits"]["train"], report["splits"][list(expected)[-1]]
    assert (train_summary["missing"], train_summary["missing_examples"]) == (1, [train[0]])
    assert train_summary["unreadable_examples"] == [train[1]]
    assert last_summary["unreadable_examples"][-1] == last[-1]
    quick = inspect_dataset(name, root, check_images=False)
    assert quick["splits"]["train"]["missing"] == 1 and quick["splits"]["train"]["unreadable"] is None


def test_inspect_vehicleid_one_size_and_inshop_pairing(built):
    report = inspect_dataset("vehicleid", built["vehicleid"][0], vehicleid_test_size=1600)
    assert sorted(report["splits"]) == ["test_1600", "train"]
    report = inspect_dataset("inshop", built["inshop"][0], check_images=False)
    assert report["splits"]["query"]["items_without_gallery"] == 0


def test_registry_matches_config():
    assert set(BENCHMARKS) == set(RECALL_KS)
    dataset_choices = typing.get_args(typing.get_type_hints(DataConfig)["dataset"])
    assert set(BENCHMARKS) <= set(dataset_choices)


# ---- presets -------------------------------------------------------------------------------


def _key_paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        paths += _key_paths(value, dotted + ".") if isinstance(value, dict) else [dotted]
    return paths


def _valid_path(cls: type, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return False
    default = getattr(cls(), head)
    if not rest:
        return not dataclasses.is_dataclass(default)
    return dataclasses.is_dataclass(default) and _valid_path(type(default), rest)


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _deep_merge(base[key], value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("name", NAMES)
def test_paper_preset_is_valid(name):
    preset = yaml.safe_load((PRESETS / f"paper-{name}.yaml").read_text())
    bad = [path for path in _key_paths(preset) if not _valid_path(Params, path)]
    assert not bad, f"unknown keys in paper-{name}.yaml: {bad}"
    assert "tracking" not in preset and "sweep" not in preset and "root" not in preset["data"]
    params = params_from_dict(_deep_merge(to_dict(Params()), preset))
    assert params.data.dataset == name and params.eval.recall_ks == RECALL_KS[name]
    assert (params.model.backbone, params.model.pretrained, params.model.embedding_dim) == (
        "resnet50",
        "imagenet",
        128,
    )
    assert (params.train.batch_size, params.train.images_per_class, params.train.epochs) == (80, 4, 200)
    assert params.train.lr_backbone == params.train.lr_embedding == 1e-5
    assert params.cluster.recluster_every == 2
    assert params.cluster.num_learners == (4 if name in ("cub200", "cars196") else 8)


TPAMI_KEYS = {
    ("model", "learners"): "masks",
    ("model", "mask_init"): "ones",
    ("model", "mask_decorrelation"): 0.01,
    ("model", "mask_split_state"): "reset",  # the authors' code: new mask parameters at every split
    ("train", "lr_masks"): 1e-3,
    ("train", "mask_weight_decay"): 1e-4,
    ("cluster", "hierarchical"): True,
    ("cluster", "space"): "backbone",  # the authors' penultimate_for_clusters=1 (features L2-normalised)
}


@pytest.mark.parametrize("name", NAMES)
def test_tpami_preset_is_the_paper_preset_with_the_tpami_learners(name):
    """tpami-<name> = paper-<name> + masks + hierarchical division (+ d=512 on SOP)."""
    paper = yaml.safe_load((PRESETS / f"paper-{name}.yaml").read_text())
    tpami = yaml.safe_load((PRESETS / f"tpami-{name}.yaml").read_text())
    bad = [path for path in _key_paths(tpami) if not _valid_path(Params, path)]
    assert not bad, f"unknown keys in tpami-{name}.yaml: {bad}"
    params = params_from_dict(_deep_merge(to_dict(Params()), tpami))
    for (section, key), value in TPAMI_KEYS.items():
        assert getattr(getattr(params, section), key) == value, (section, key)
        tpami[section].pop(key)
    assert paper["cluster"].pop("space") == "embedding"  # CVPR: the paper's embedding space
    if name == "sop":
        assert tpami["model"].pop("embedding_dim") == 512
        paper["model"].pop("embedding_dim")
    assert tpami == paper
    k = params.cluster.num_learners
    assert k & (k - 1) == 0  # hierarchical: a power of two


# ---- real copies (skipped unless an environment variable points to one) --------------------

PUBLISHED = {
    "cub200": {"train": (5864, 100), "test": (5924, 100)},
    "cars196": {"train": (8054, 98), "test": (8131, 98)},
    "sop": {"train": (59551, 11318), "test": (60502, 11316)},
    "inshop": {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)},
    "vehicleid": {
        "train": (None, 13164),
        "test_800": (None, 800),
        "test_1600": (None, 1600),
        "test_2400": (None, 2400),
    },
}


def _real_root(name: str) -> str | None:
    return os.environ.get(f"DCML_{name.upper()}_ROOT") or None


REAL = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(_real_root(name) is None, reason=f"DCML_{name.upper()}_ROOT not set"),
    )
    for name in NAMES
]


@pytest.mark.parametrize("name", REAL)
def test_real_copy_matches_published_counts(name):
    root = Path(str(_real_root(name)))
    named = named_splits(name, root)
    for split, (images, classes) in PUBLISHED[name].items():
        records = named[split]
        if split in ("query", "gallery"):  # both carry the 3,985-item test label space
            classes_present = len(set(records.labels.tolist()))
            assert (len(records), classes_present) == (images, classes), split
            continue
        assert images is None or len(records) == images, split
        assert records.num_classes == classes, split
    sizes = VEHICLEID_TEST_IDS if name == "vehicleid" else [None]
    for size in sizes:
        check_protocol(name, load_benchmark(name, root, **({"test_size": size} if size else {})))
