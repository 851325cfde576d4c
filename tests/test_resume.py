"""kill -9 of a real `dcml train`, a code edit, and a rerun: the run continues from its
newest checkpoint and ends with the metrics of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dcml.config import load_params, to_dict
from dcml.data import build_bundle, load_splits
from dcml.fit import fit
from tasks import io
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT, shrink


def dcml_train(src: Path, params: Path, out: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "PREFECT_HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "train", "--params", str(params), "--out", str(out)]
    return subprocess.Popen(
        command, cwd=src, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-3000:]
    return output


def run_folder(out: Path) -> RunLayout:
    (folder,) = (out / "runs").iterdir()
    return RunLayout(folder)


@pytest.mark.slow  # 1-2 min: in make test-slow (CI runs both)
def test_kill_then_code_edit_then_rerun_continues_and_matches_an_uninterrupted_run(tmp_path, tiny_demo_root):
    src = tmp_path / "src"  # a copy of the sources, so that a comment can be edited
    for package in ("dcml", "tasks", "flows"):
        shutil.copytree(REPO_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=5))
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(to_dict(params)))

    # the uninterrupted reference: the same schedule in one process (dcml.fit)
    params = load_params(params_path)
    reference = fit(params, build_bundle(load_splits(params.data), params.data), torch.device("cpu"))
    expected = reference.evaluations[-1][1]

    out = tmp_path / "out"
    process = dcml_train(src, params_path, out, tmp_path / "home-2")
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*/checkpoints/epoch-0001.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the flow and its temporary Prefect server
    process.wait()
    layout = run_folder(out)
    resume_epoch = layout.latest_checkpoint_epoch()
    assert not layout.final_metrics.exists() and resume_epoch < 5, "killed too late to test a resume"
    assert len(layout.checkpoints()) <= 2

    plots = src / "tasks" / "plots.py"
    plots.write_text(plots.read_text() + "\n# a comment edited between the two invocations\n")
    output = finish(dcml_train(src, params_path, out, tmp_path / "home-3"))

    assert run_folder(out).root == layout.root  # the same run folder, not a new one
    assert f"continuing from the checkpoint of epoch {resume_epoch}" in output
    versions = io.read_json(layout.code_versions)
    assert [v["from_epoch"] for v in versions] == [0, resume_epoch]
    assert versions[0]["source_digest"] != versions[1]["source_digest"]
    epochs_trained = sorted(io.read_json(p)["epoch"] for p in (layout.root / "history").glob("train-epoch-*.json"))
    assert epochs_trained == [0, 1, 2, 3, 4]
    assert list(layout.checkpoints()) == [5]
    final = io.read_json(layout.final_metrics)
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r"):
        assert final[key] == expected[key], key  # bit-identical, not approximately equal
