"""Layered params: defaults < preset < params file < overrides; every key optional; typos
suggested; `dcml params show`; the repository's params.yaml resolves as before."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from dcml.config import (
    BASELINE_VALUES,
    LEARNER_VARIANT_KEYS,
    PRESETS_DIR,
    STORED_FALLBACK,
    ConfigError,
    Params,
    all_keys,
    available_presets,
    flatten,
    load_params,
    load_with_sources,
    params_from_dict,
    params_from_stored,
    to_dict,
    with_num_learners,
)
from dcml.config_schema import doc_of
from tasks.layout import params_digest
from tests.conftest import REPO_ROOT

# The demo runs' key (tasks/layout.py params_digest of the resolved repository params.yaml),
# computed before the defaults moved into the dataclasses: the demo's run folders, DVC
# outputs and MLflow runs stay the same only while this holds. K=1 has its own key.
DEMO_DIGEST = "af281307"
DEMO_K1_DIGEST = "0e1c9876"
# sha256 of the whole resolved dict (also the keys that are not part of the run key:
# tracking, sweep, retrieval, ...), before the change
DEMO_DICT_SHA = "436fc9a6f1e2565d"  # + model.mask_split_state (inherit: what ran before)
DEMO_K1_DICT_SHA = "622e36e24cb4813b"  # + model.mask_split_state


def write(tmp_path, content: str | dict, name: str = "params.yaml") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def sha(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def preset_leaves(name: str) -> dict[str, object]:
    preset = yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text())
    out: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = node

    walk("", preset)
    return out


# ---- every key optional -----------------------------------------------------------------------


def test_a_three_line_params_file_loads_with_the_defaults(tmp_path):
    path = write(
        tmp_path,
        "data: {root: data/mine}\ntrain: {epochs: 4}\ncluster: {divide_until_epoch: 2, finetune_from_epoch: 2}\n",
    )
    params = load_params(path)
    defaults = Params()
    assert params == dataclasses.replace(
        defaults,
        data=dataclasses.replace(defaults.data, root="data/mine"),
        train=dataclasses.replace(defaults.train, epochs=4),
        cluster=dataclasses.replace(defaults.cluster, divide_until_epoch=2, finetune_from_epoch=2),
    )
    assert params.model.backbone == "small_cnn" and params.train.device == "auto"  # CPU-sized demo
    _, sources = load_with_sources(path)
    assert {key for key, source in sources.items() if source != "default"} == {
        "data.root",
        "train.epochs",
        "cluster.divide_until_epoch",
        "cluster.finetune_from_epoch",
    }


@pytest.mark.parametrize("content", ["", "seed: 3\n", "cluster:\n  # num_learners: 8\n", "overrides:\n"])
def test_an_empty_or_tiny_params_file_is_the_defaults(tmp_path, content):
    params = load_params(write(tmp_path, content))
    assert dataclasses.replace(params, seed=0) == Params()


def test_the_defaults_are_valid_and_fully_documented():
    assert params_from_dict(to_dict(Params())) == Params()

    def check(cls: type) -> int:
        count = 0
        for f in dataclasses.fields(cls):
            doc = doc_of(cls, f.name)
            assert doc.strip() and "\n" not in doc, f"{cls.__name__}.{f.name} needs a one-line doc"
            default = getattr(cls(), f.name)
            count += check(type(default)) if dataclasses.is_dataclass(default) else 1
        return count

    assert check(Params) == len(flatten(Params()))


# ---- precedence ---------------------------------------------------------------------------------


def test_params_yaml_beats_the_preset_and_the_preset_fills_the_rest(tmp_path):
    """The issue's case: `preset: paper-cars196` + K=8 in params.yaml trains K=8."""
    raw = {"preset": "paper-cars196", "data": {"root": "data/cars"}, "cluster": {"num_learners": 8}}
    params, sources = load_with_sources(write(tmp_path, raw))
    assert params.cluster.num_learners == 8 and sources["cluster.num_learners"].endswith("params.yaml")
    values = flatten(params)
    preset = preset_leaves("paper-cars196")
    assert preset["cluster.num_learners"] == 4
    for key, value in preset.items():
        if key != "cluster.num_learners":
            assert values[key] == value, key
            assert sources[key] == "preset paper-cars196", key
    defaults = flatten(Params())
    for key, value in values.items():
        if key not in preset and key not in ("preset", "data.root", "cluster.num_learners"):
            assert value == defaults[key] and sources[key] == "default", key


def test_overrides_beat_the_params_file_and_may_name_the_preset(tmp_path):
    raw = {
        "preset": "paper-cub200",
        "data": {"root": "d"},
        "train": {"epochs": 150},
        "overrides": {"train": {"epochs": 195}, "cluster": {"num_learners": 2}},
    }
    params, sources = load_with_sources(write(tmp_path, raw))
    assert (params.train.epochs, params.cluster.num_learners) == (195, 2)
    assert sources["train.epochs"] == sources["cluster.num_learners"] == "overrides"
    raw["overrides"]["preset"] = "tpami-cub200"
    assert load_params(write(tmp_path, raw)).model.learners == "masks"


@pytest.mark.parametrize("name", available_presets())
def test_a_short_file_with_a_preset_is_the_preset_on_the_defaults(tmp_path, name):
    """What `preset: X` on the full params.yaml gave before the layers changed."""
    params = load_params(write(tmp_path, {"preset": name}))
    expected = to_dict(Params())
    for key, value in preset_leaves(name).items():
        section, *rest = key.split(".")
        node = expected[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    expected["preset"] = name
    assert to_dict(params) == expected


# ---- typos and types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochz": 3}}, "unknown key: train.epochz in {path}; did you mean train.epochs?"),
        ({"clsuter": {"num_learners": 8}}, "unknown key: clsuter in {path}; did you mean cluster?"),
        (
            {"train": {"num_learners": 8}},
            "unknown key: train.num_learners in {path}; did you mean cluster.num_learners?",
        ),
        ({"overrides": {"data": {"rot": "x"}}}, "unknown key: data.rot in overrides; did you mean data.root?"),
        ({"cluster": {"k": 8}}, "unknown key: cluster.k in {path}; valid keys here: divide_until_epoch"),
        ({"train": {"epochs": "ten"}}, "train.epochs: expected an integer, got 'ten'"),
        ({"cluster": {"hierarchical": "yes"}}, "cluster.hierarchical: expected true/false"),
        ({"data": "data/mine"}, "data: expected a mapping"),
        ({"preset": "paper-nothing"}, "preset: unknown preset 'paper-nothing'"),
    ],
)
def test_unknown_keys_suggest_the_closest_and_type_errors_name_the_key(tmp_path, raw, message):
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=re.escape(message.format(path=path))):
        load_params(path)


def test_a_typo_in_a_preset_names_the_preset(tmp_path, monkeypatch):
    import dcml.config_layers

    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "mine.yaml").write_text("train: {epohcs: 3}\n")
    monkeypatch.setattr(dcml.config_layers, "PRESETS_DIR", presets)
    with pytest.raises(ConfigError, match=r"unknown key: train.epohcs in preset mine; did you mean train.epochs\?"):
        load_params(write(tmp_path, {"preset": "mine"}))


# ---- the repository's params.yaml ---------------------------------------------------------------


def test_the_repository_params_resolve_to_the_defaults_and_the_demo_run_keys():
    params, sources = load_with_sources(REPO_ROOT / "params.yaml")
    assert params == Params() and to_dict(params) == to_dict(Params())
    assert set(sources.values()) == {str(REPO_ROOT / "params.yaml")}  # it sets every key
    assert params_digest(to_dict(params)) == DEMO_DIGEST
    assert sha(to_dict(params)) == DEMO_DICT_SHA
    baseline = with_num_learners(params, 1, 0)
    assert params_digest(to_dict(baseline)) == DEMO_K1_DIGEST and sha(to_dict(baseline)) == DEMO_K1_DICT_SHA
    assert params_digest(to_dict(with_num_learners(params, 4, 0))) == DEMO_DIGEST


def test_the_repository_params_are_the_full_commented_reference():
    """Every key of the schema, each leaf line with a comment."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert raw.pop("overrides") == {}
    leaves = [key for key in all_keys() if key in flatten(Params())]
    assert sorted(flatten(params_from_dict(raw))) == sorted(leaves)
    sections = {key.rsplit(".", 1)[-1] for key in all_keys() if key not in leaves}
    for number, line in enumerate((REPO_ROOT / "params.yaml").read_text().splitlines(), 1):
        name = line.split(":", 1)[0].strip()
        if line.strip() and not line.lstrip().startswith("#") and name not in sections:
            assert "#" in line, f"params.yaml:{number}: {name} has no comment"


# ---- stored params and the K=1 baseline: as before -------------------------------------------


def test_stored_params_lacking_keys_read_as_before():
    """A run's stored params that predate a key take the value the run had, not the demo's."""
    stored = to_dict(with_num_learners(Params(), 4, 0))
    assert params_from_stored(stored) == with_num_learners(Params(), 4, 0)
    for key, value in {"eval.every_epochs": 2, "train.lr_masks": 1e-5, "model.learners": "slices"}.items():
        section, name = key.split(".")
        partial = json.loads(json.dumps(stored))
        partial[section].pop(name)
        assert getattr(getattr(params_from_stored(partial), section), name) == value, key
    expected = flatten(Params()) | STORED_FALLBACK
    assert flatten(params_from_stored({})) == expected


def test_the_k1_baseline_resets_the_learner_variants_to_fixed_values(tmp_path):
    assert set(BASELINE_VALUES) == set(LEARNER_VARIANT_KEYS)
    tpami = load_params(write(tmp_path, {"preset": "tpami-cub200"}))
    cvpr = load_params(write(tmp_path, {"preset": "paper-cub200"}, "cvpr.yaml"))
    baseline = with_num_learners(tpami, 1, 0)
    cvpr_baseline = with_num_learners(cvpr, 1, 0)
    assert (tpami.cluster.space, cvpr.cluster.space) == ("backbone", "embedding")
    assert baseline == dataclasses.replace(cvpr_baseline, preset="tpami-cub200")  # the same but for the name
    assert {key: flatten(baseline)[key] for key in BASELINE_VALUES} == BASELINE_VALUES


# ---- dcml params show ---------------------------------------------------------------------------


def run_show(argv: list[str]) -> int:
    from flows.cli import _run
    from flows.cli_params import add_commands

    parser = argparse.ArgumentParser(prog="dcml")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return _run(parser.parse_args(argv))


def test_params_show_names_the_source_of_each_key(tmp_path, capsys):
    path = write(
        tmp_path,
        {
            "preset": "paper-cars196",
            "data": {"root": "data/cars"},
            "cluster": {"num_learners": 8},
            "overrides": {"train": {"epochs": 195}},
        },
    )
    assert run_show(["params", "show", "--params", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# default < preset paper-cars196 < {path} < overrides"
    rows = {line.split()[0]: line.split(None, 1)[1].rsplit("  ", 1) for line in lines[1:]}
    assert len(rows) == len(flatten(Params()))
    assert [part.strip() for part in rows["cluster.num_learners"]] == ["8", path]
    assert [part.strip() for part in rows["model.backbone"]] == ["resnet50", "preset paper-cars196"]
    assert [part.strip() for part in rows["train.epochs"]] == ["195", "overrides"]
    assert [part.strip() for part in rows["train.device"]] == ["auto", "default"]
    assert [part.strip() for part in rows["tracking.experiment"]] == ['""', "default"]

    assert run_show(["params", "show", "--params", path, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["layers"] == ["default", "preset paper-cars196", path, "overrides"]
    assert shown["params"] == to_dict(load_params(path))
    assert shown["sources"]["cluster.num_learners"] == path and shown["sources"]["seed"] == "default"
    assert set(shown["sources"]) == set(flatten(Params()))


def test_params_show_redacts_credentials_and_fails_like_the_other_commands(tmp_path, capsys):
    path = write(tmp_path, {"tracking": {"mlflow_uri": "postgresql://me:secret@db/mlflow"}})
    assert run_show(["params", "show", "--params", path]) == 0
    out = capsys.readouterr().out
    assert "secret" not in out and "***@db" in out
    assert run_show(["params", "show", "--params", write(tmp_path, {"train": {"epochz": 1}})]) == 2
    assert "did you mean train.epochs?" in capsys.readouterr().err
    # a broken cross-field rule: the table first (where the values came from), then the error
    assert run_show(["params", "show", "--params", write(tmp_path, {"train": {"epochs": 5}})]) == 2
    captured = capsys.readouterr()
    assert "train.epochs" in captured.out and "epoch boundaries" in captured.err


def test_dcml_params_show_is_a_dcml_command(capsys):
    from flows.cli import main, parser

    if "params" not in parser()._subparsers._group_actions[0].choices:  # noqa: SLF001
        pytest.skip("flows/cli.py does not register flows.cli_params.add_commands yet")
    assert main(["params", "show", "--params", str(REPO_ROOT / "params.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == to_dict(Params())


# ---- DVC with a short params.yaml ---------------------------------------------------------------


def test_dvc_reads_a_short_params_file_that_keeps_data_root_and_retrieval(tmp_path):
    dvc = shutil.which("dvc", path=str(os.path.dirname(sys.executable)))
    if dvc is None:
        pytest.skip("dvc is not installed")
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["sweep"]["params"] == [{"params.yaml": None}]  # the whole file, whichever keys it sets
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    for command in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    short = {"preset": "paper-cub200", "data": {"root": "data/cub"}, "retrieval": {"split": "test", "factory": "Flat"}}
    write(tmp_path, short)

    def status() -> subprocess.CompletedProcess:
        return subprocess.run([dvc, "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    result = status()
    assert result.returncode == 0, result.stderr
    assert "params.yaml" in result.stdout  # the sweep stage tracks it
    del short["retrieval"]
    write(tmp_path, short)
    result = status()
    assert result.returncode != 0 and "retrieval.split" in result.stderr  # docs/parameters.md: keep the section
