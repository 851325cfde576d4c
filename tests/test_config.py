import dataclasses

import pytest
import yaml

from dcml.config import (
    ConfigError,
    Params,
    available_presets,
    check_against_data,
    flatten,
    load_params,
    params_from_dict,
    to_dict,
    with_num_learners,
)
from tests.conftest import REPO_ROOT


def raw_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def write(tmp_path, raw) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_project_params_load_and_round_trip():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params_from_dict(to_dict(params)) == params
    assert flatten(params)["cluster.num_learners"] == params.cluster.num_learners


def test_params_are_frozen():
    params = load_params(REPO_ROOT / "params.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["train"].update(epochz=3), "unknown key: train.epochz in "),
        (lambda r: r["train"].update(epochz=3), "did you mean train.epochs?"),
        (lambda r: r.update(overrides={"train": {"epochz": 3}}), "unknown key: train.epochz in overrides"),
        (lambda r: r["cluster"].update(recluster_every=None), "cluster.recluster_every: expected an integer"),
        (lambda r: r.update(cluster=4), "cluster: expected a mapping"),
        (lambda r: r["model"].update(backbone="vgg"), "model.backbone"),
        (lambda r: r["train"].update(epochs="ten"), "train.epochs: expected an integer"),
        (lambda r: r["model"].update(freeze_bn="yes"), "model.freeze_bn: expected true/false"),
        (lambda r: r["eval"].update(recall_ks=[1, "x"]), "eval.recall_ks[1]"),
        (lambda r: r["model"].update(embedding_dim=30), "divisible by cluster.num_learners"),
        (lambda r: r["train"].update(batch_size=30), "train.batch_size (30) must be divisible"),
        (lambda r: r["cluster"].update(divide_until_epoch=10, finetune_from_epoch=5), "epoch boundaries"),
        (lambda r: r["cluster"].update(finetune_from_epoch=99), "epoch boundaries"),
        (lambda r: r["sweep"].update(num_learners=[1, 5]), "sweep.num_learners: 5"),
        (lambda r: r.update(preset="paper-nothing"), "preset: unknown preset"),
        (lambda r: r["data"].update(num_workers="many"), "data.num_workers: 'many' is not an integer or 'auto'"),
        (lambda r: r["data"].update(num_workers=-1), "data.num_workers must be >= 0 or auto"),
        (lambda r: r["eval"].update(nmi="sometimes"), "eval.nmi: 'sometimes' is not one of"),
        (lambda r: r["eval"].update(nmi=1), "eval.nmi: 1 is not one of"),
        (lambda r: r["train"].update(keep_checkpoints=0), "train.keep_checkpoints must be >= 1"),
        (lambda r: r["train"].update(deterministic=True, cudnn_benchmark=True), "exclude each other"),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, message):
    raw = raw_params()
    mutate(raw)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_params(write(tmp_path, raw))


def test_k_larger_than_half_the_training_classes_is_rejected():
    """Each learner needs two classes: K=4 with 7 classes would fail at the first division."""
    params = load_params(REPO_ROOT / "params.yaml")
    check_against_data(with_num_learners(params, 4), num_train_classes=8)
    with pytest.raises(ConfigError, match=r"exceeds the number of training classes \(7\) / 2"):
        check_against_data(with_num_learners(params, 4), num_train_classes=7)


def test_recall_k_larger_than_the_retrieval_set_is_rejected():
    params = load_params(REPO_ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="eval.recall_ks: 8 exceeds the 5 items"):
        check_against_data(params, num_train_classes=100, num_retrieval_items=5)


@pytest.mark.parametrize(
    ("section", "changes", "message"),
    [
        ("loss", {"nu": 0.1}, "loss.nu regularises a learnable beta"),
        ("loss", {"name": "triplet", "beta_mode": "global"}, "apply to the margin loss only"),
        ("model", {"freeze_bn": True, "pretrained": "none"}, "model.freeze_bn"),
        ("train", {"weight_decay": -1.0}, "train.weight_decay"),
    ],
)
def test_options_that_would_be_silently_ignored_are_rejected(tmp_path, section, changes, message):
    raw = raw_params()
    raw[section].update(changes)
    with pytest.raises(ConfigError, match=message):
        load_params(write(tmp_path, raw))


def test_a_preset_fills_what_the_params_file_leaves_out_and_the_file_beats_it(tmp_path):
    assert "paper-cub200" in available_presets()
    raw = {"preset": "paper-cub200", "data": {"root": "data/cub"}, "sweep": {"num_learners": [1, 4]}}
    params = load_params(write(tmp_path, raw))
    assert params.model.backbone == "resnet50" and params.train.batch_size == 80
    assert params.data.root == "data/cub"  # presets never move the data
    raw["train"] = {"epochs": 100}
    raw["cluster"] = {"divide_until_epoch": 90, "finetune_from_epoch": 90}
    params = load_params(write(tmp_path, raw))
    assert (params.train.epochs, params.cluster.divide_until_epoch) == (100, 90)
    raw["overrides"] = {"cluster": {"divide_until_epoch": 80}}
    params = load_params(write(tmp_path, raw))
    assert (params.cluster.divide_until_epoch, params.cluster.finetune_from_epoch) == (80, 90)


def test_a_full_params_file_leaves_nothing_to_the_preset(tmp_path):
    """params.yaml sets every key: a preset beneath it changes nothing (use a short file)."""
    raw = raw_params()
    raw["preset"] = "paper-cub200"
    assert dataclasses.replace(load_params(write(tmp_path, raw)), preset="none") == load_params(
        REPO_ROOT / "params.yaml"
    )


def test_sweep_copies_with_replace_and_validate():
    params = load_params(REPO_ROOT / "params.yaml")
    baseline = with_num_learners(params, 1, seed=7)
    assert baseline.cluster.num_learners == 1 and baseline.seed == 7
    assert params.cluster.num_learners != 1 or params.seed != 7
    with pytest.raises(ConfigError):
        with_num_learners(params, 3)  # does not divide the embedding


@pytest.mark.parametrize(("key", "value"), [("num_workers", "auto"), ("num_workers", 3)])
def test_num_workers_is_an_integer_or_auto(tmp_path, key, value):
    raw = raw_params()
    raw["data"][key] = value
    assert load_params(write(tmp_path, raw)).data.num_workers == value


def test_every_preset_loads_with_gpu_settings_and_a_sparse_evaluation_cadence(tmp_path):
    for name in available_presets():
        params = load_params(write(tmp_path, {"preset": name, "data": {"root": "somewhere"}}))
        assert params.train.bf16 and params.train.channels_last and params.train.tf32, name
        assert params.data.num_workers == "auto" and params.eval.every_epochs >= 5, name
