"""`dvc repro` in a temporary git repository: the real DVC driving the real pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dcml.config import load_params, to_dict
from tests.conftest import REPO_ROOT, TINY_IMAGE_SIZE, TINY_IMAGES_PER_CLASS, shrink


def sh(*command: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project's pipeline files with tiny params and a DVC-tracked tiny demo."""
    from dcml.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("project")
    for name in ("dcml", "tasks", "flows"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    generate_demo_dataset(root / "data" / "demo", images_per_class=TINY_IMAGES_PER_CLASS, image_size=TINY_IMAGE_SIZE)
    params = shrink(load_params(REPO_ROOT / "params.yaml"), Path("data/demo"), tracking_uri="sqlite:///mlflow.db")
    raw = to_dict(params)
    raw["overrides"] = {}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(root / ".prefect-home"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    (root / ".gitignore").write_text("mlflow.db\nmlartifacts/\n.prefect-home/\n")
    sh("git", "init", "-q", cwd=root, env=env)
    sh("dvc", "init", "-q", cwd=root, env=env)
    sh("dvc", "add", "-q", "data/demo", cwd=root, env=env)
    sh("git", "add", "-A", cwd=root, env=env)
    sh("git", "commit", "-qm", "project", cwd=root, env=env)
    sh("dvc", "repro", cwd=root, env=env)
    return root, env


def test_dvc_repro_runs_the_sweep_and_leaves_the_pipeline_up_to_date(project):
    root, env = project
    assert "up to date" in sh("dvc", "status", cwd=root, env=env)
    metrics = json.loads(sh("dvc", "metrics", "show", "--json", cwd=root, env=env))
    values = next(iter(metrics.values()))["data"]["outputs/metrics.json"]["data"]
    assert set(values) == {"K1-seed0", "K4-seed0", "summary", "vs_K1"} and 0 < values["K4-seed0"]["recall@1"] <= 1
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["sweep"]
    assert lock["params"]["params.yaml"]["cluster"]["num_learners"] == 4
    assert any(dep["path"] == "data/demo" for dep in lock["deps"])
    runs = sorted(p.name.rsplit("-", 1)[0] for p in (root / "outputs" / "runs").iterdir())
    assert runs == ["K1-seed0", "K4-seed0"]


@pytest.mark.slow  # 1-2 min: in make test-slow (CI runs both)
def test_dvc_exp_run_with_another_k_list_reuses_the_baseline(project):
    root, env = project
    baseline = next((root / "outputs" / "runs").glob("K1-seed0-*"))
    stamp = (baseline / "checkpoints" / "epoch-0003.pt").stat().st_mtime_ns
    sh("dvc", "exp", "run", "-S", "sweep.num_learners=[2]", cwd=root, env=env)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=root, env=env))
    text = json.dumps(shown)
    assert "K2-seed0" in text and "recall@1" in text
    assert (baseline / "checkpoints" / "epoch-0003.pt").stat().st_mtime_ns == stamp  # not retrained
    assert sorted(p.name.rsplit("-", 1)[0] for p in (root / "outputs" / "runs").iterdir()) == [
        "K1-seed0",
        "K2-seed0",
    ]
