"""The README's command blocks: each is marked runnable or says why not, and the runnable
ones run, verbatim, in a temporary clone after a tiny `dvc repro` (slow)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

MARKER = re.compile(r"<!-- (runnable|not run): ?([^>]*)-->")


def blocks(readme: Path = REPO_ROOT / "README.md") -> list[tuple[str | None, str, str, str]]:
    """Every fenced block: (marker kind or None, marker text, language, body)."""
    lines, found, marker = readme.read_text().splitlines(), [], None
    index = 0
    while index < len(lines):
        line = lines[index]
        match = MARKER.search(line)
        if match:
            marker = match.groups()
        elif line.startswith("```"):
            language, body = line[3:].strip(), []
            index += 1
            while not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            kind, text = marker if marker else (None, "")
            found.append((kind, text.strip(), language, "\n".join(body)))
            marker = None
        elif line.strip():
            marker = None  # a marker belongs to the block right below it
        index += 1
    return found


def test_every_shell_block_is_marked_runnable_or_says_why_not():
    unmarked = [body.splitlines()[0] for kind, _, language, body in blocks() if language == "bash" and kind is None]
    assert not unmarked, f"README bash blocks without <!-- runnable: name --> or <!-- not run: why -->: {unmarked}"
    assert any(kind == "runnable" for kind, *_ in blocks())


def runnable(name: str) -> str:
    (body,) = [body for kind, text, _, body in blocks() if kind == "runnable" and text.split()[0] == name]
    return body


def _run(command: list[str] | str, cwd: Path, env: dict, timeout: int = 900, shell: bool = False) -> str:
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", command] if shell else command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its background servers die with the group
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_use_the_model_block_runs_on_a_tiny_demo(tmp_path):
    """A clone with a tiny demo (3 epochs, 32 px) reproduced by `dvc repro`, then the README's
    "Use the model" block, as a user would paste it."""
    from dcml.config import load_params, to_dict
    from tests.conftest import shrink

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO_ROOT / ".venv")
    params = to_dict(shrink(load_params(clone / "params.yaml"), Path("data/demo"), "sqlite:///mlflow.db"))
    params["tracking"]["log_model"] = True
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    bin_dir = REPO_ROOT / ".venv" / "bin"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # dvc runs `dcml`, as after `source .venv/bin/activate`
    _run([str(bin_dir / "dcml"), "data", "demo"], clone, env)
    _run([str(bin_dir / "dvc"), "commit", "--force", "--quiet", "data.dvc"], clone, env)
    _run([str(bin_dir / "dvc"), "repro", "--quiet"], clone, env, timeout=1200)
    output = _run(runnable("use-the-model"), clone, env, shell=True)
    assert '"rank": 1' in output and '"neighbors"' in output and '"predictions"' in output
    status = _run([str(bin_dir / "dvc"), "status"], clone, env)
    assert "up to date" in status, status
    shutil.rmtree(clone, ignore_errors=True)
