"""Bad input: one clear message naming the cause, exit status 2, nothing written."""

import dataclasses
import json
import os

import pytest
import yaml

from dcml.config import load_params, to_dict
from flows.cli import main, parser
from tests.conftest import REPO_ROOT, shrink


@pytest.fixture()
def params_file(tmp_path, tiny_demo_root):
    def write(**changes):
        params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root)
        raw = to_dict(dataclasses.replace(params, **changes))
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


def run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_dataset_folder(tmp_path, params_file, capsys):
    params = load_params(params_file())
    path = params_file(data=dataclasses.replace(params.data, root=str(tmp_path / "nowhere")))
    code, err = run(["sweep", "--params", path, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "dataset folder not found" in err and "nowhere" in err
    assert not (tmp_path / "out").exists()


def test_empty_dataset_folder(tmp_path, params_file, capsys):
    (tmp_path / "empty").mkdir()
    params = load_params(params_file())
    path = params_file(data=dataclasses.replace(params.data, root=str(tmp_path / "empty"), dataset="folder"))
    code, err = run(["train", "--params", path, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no class folders with images" in err


def test_wrong_params_key(tmp_path, capsys):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["cluster"]["num_lerners"] = 4
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, err = run(["sweep", "--params", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "unknown key: cluster.num_lerners" in err


def test_k_larger_than_training_classes(tmp_path, params_file, capsys):
    params = load_params(params_file())
    model = dataclasses.replace(params.model, embedding_dim=128)
    path = params_file(model=model)
    code, err = run(["sweep", "--params", path, "--out", str(tmp_path / "out"), "-k", "32"], capsys)
    assert code == 2 and "exceeds the number of training classes (56) / 2" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_folder(tmp_path, params_file, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = run(["train", "--params", params_file(), "--out", str(locked / "out")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2 and "not writable" in err


def test_output_path_that_is_a_file(tmp_path, params_file, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run(["train", "--params", params_file(), "--out", str(tmp_path / "file" / "out")], capsys)
    assert code == 2 and "cannot be created" in err


def test_help_explains_every_command():
    text = parser().format_help()
    for command in ("train", "sweep", "evaluate", "data", "deploy"):
        assert command in text


def test_data_inspect_prints_json(tmp_path, capsys):
    from tests.data.fake_benchmarks import make_cub200

    root = tmp_path / "CUB_200_2011"
    make_cub200(root)
    assert main(["data", "inspect", "--dataset", "cub200", "--root", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["classes"] == 100
    code, err = run(["data", "inspect", "--dataset", "cars196", "--root", str(tmp_path)], capsys)
    assert code == 2 and "cars_annos.mat not found" in err
