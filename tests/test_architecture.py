"""Boundaries of the architecture: dcml is the pure method."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_importing_dcml_pulls_in_no_orchestration_or_tracking():
    code = (
        "import sys, dcml, dcml.fit, dcml.trainer, dcml.data, dcml.data.benchmarks, dcml.metrics;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow', 'dvc'));"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == ""


def test_no_hard_coded_cuda_or_unsafe_loads():
    for path in (REPO_ROOT / "dcml").rglob("*.py"):
        text = path.read_text()
        assert ".cuda()" not in text, path
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, path
