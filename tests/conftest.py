"""Shared fixtures: the real params.yaml shrunk in one place, a tiny generated dataset,
and isolated Prefect/MLflow state per test session (telemetry off)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest

for key, value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}.items():
    os.environ.setdefault(key, value)
# the tests never touch ~/.prefect or a server named in the shell
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dcml-test-prefect-home-")
os.environ.pop("PREFECT_API_URL", None)

from dcml.config import Params, load_params  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_IMAGES_PER_CLASS = 8
TINY_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def tiny_demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset at 32 px with 8 images per class (generated once per session)."""
    from dcml.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("data") / "demo"
    generate_demo_dataset(root, images_per_class=TINY_IMAGES_PER_CLASS, image_size=TINY_IMAGE_SIZE, seed=0)
    return root


def shrink(params: Params, data_root: Path, tracking_uri: str = "sqlite:///:memory:") -> Params:
    """The project's real params, made tiny: 3 epochs, 32 px, small batches, CPU."""
    r = dataclasses.replace
    return r(
        params,
        data=r(
            params.data,
            root=str(data_root),
            image_size=TINY_IMAGE_SIZE,
            resize_size=36,
            demo=r(params.data.demo, images_per_class=TINY_IMAGES_PER_CLASS, image_size=TINY_IMAGE_SIZE),
        ),
        model=r(params.model, embedding_dim=32),
        train=r(params.train, epochs=3, batch_size=16, images_per_class=4, device="cpu"),
        cluster=r(
            params.cluster,
            num_learners=4,
            recluster_every=1,
            divide_until_epoch=2,
            finetune_from_epoch=2,
            niter=10,
        ),
        eval=r(params.eval, batch_size=128),
        tracking=r(params.tracking, mlflow_uri=tracking_uri, log_model=False),
        sweep=r(params.sweep, num_learners=(1, 4), seeds=(0,)),
    )


@pytest.fixture()
def tiny_params(tiny_demo_root: Path) -> Params:
    return shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root)


# --- the shared stack (scripts/stack.py): tests/test_stack.py, tests/test_workers.py --------------


from scripts import stack  # noqa: E402 - scripts/stack.py, the shared stack

free_ports = stack.free_ports


def query(pg_port: int, database: str, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"postgresql://dcml@127.0.0.1:{pg_port}/{database}", connect_timeout=10) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.fixture()
def running_stack(tmp_path: Path):
    pytest.importorskip("psycopg", reason="the `stack` extra: pip install -e '.[stack]'")
    try:
        stack.find_pg_bindir()
    except stack.StackError as error:
        pytest.skip(str(error))
    stack_dir = tmp_path / "stack"
    pg_port, prefect_port, mlflow_port = free_ports(3)
    try:
        state = stack.up(stack_dir, pg_port=pg_port, prefect_port=prefect_port, mlflow_port=mlflow_port)
        yield stack_dir, state
    finally:
        stack.down(stack_dir, quiet=True)  # always, even when up() or the test failed
