"""The run's image model (tasks/image_model.py): logged beside the tensor model, registered
as ``best``, and embedding encoded image files exactly as ``dcml embed`` does — loaded in
process and served by ``mlflow models serve``."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from dcml.config import load_params
from dcml.inference import load_model
from dcml.retrieval import store
from dcml.retrieval.embedding import embed_listing
from dcml.retrieval.images import list_images
from dcml.trainer import Trainer
from tasks import io as task_io
from tasks import tracking
from tests.conftest import REPO_ROOT, free_ports, shrink

CPU = torch.device("cpu")
BATCH = 4  # eval.batch_size: 7 images meet the network in batches of 4 and 3, in both paths


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _images(folder: Path) -> list[Path]:
    """Files of several formats, modes and sizes (decoding and the transform both matter)."""
    rng = np.random.default_rng(1)
    folder.mkdir()
    files = {}
    for i in range(4):
        pixels = rng.integers(0, 256, (40 + 4 * i, 36 + 8 * i, 3), dtype=np.uint8)
        files[f"rgb-{i}.png"] = _encode(Image.fromarray(pixels, "RGB"), "PNG")
    files["gray.png"] = _encode(Image.fromarray(rng.integers(0, 256, (33, 50), dtype=np.uint8), "L"), "PNG")
    rgba = rng.integers(0, 256, (48, 48, 4), dtype=np.uint8)
    files["rgba.png"] = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    files["photo.jpg"] = _encode(Image.fromarray(rng.integers(0, 256, (64, 60, 3), dtype=np.uint8), "RGB"), "JPEG")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def logged(tiny_demo_root, tmp_path_factory):
    """A tiny checkpoint (untrained, no training needed) logged by ``tracking.log_model``
    into a sqlite store and registered by ``tracking.register_best``."""
    folder = tmp_path_factory.mktemp("image-model")
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{folder / 'mlflow.db'}")
    params = dataclasses.replace(params, eval=dataclasses.replace(params.eval, batch_size=BATCH))
    checkpoint = Trainer.create(params, 10, CPU, load_pretrained=False).save(folder / "epoch-0003.pt")
    state = str(folder / "tracking.json")
    previous = mlflow.get_tracking_uri()
    try:
        run_id = tracking.start_run.fn(params, "K4-seed0", state)
        started = time.monotonic()
        ids = tracking.log_model.fn(params, run_id, str(checkpoint), state)
        log_seconds = time.monotonic() - started
        result = {"num_learners": 4, "seed": 0, "recall@1": 0.5, "mlflow_run_id": run_id, **ids}
        registered = tracking.register_best.fn(params, [result], run_id)
    finally:
        mlflow.set_tracking_uri(previous)
    files = _images(folder / "images")
    listing = list_images(folder / "images")
    assert list(listing.paths) == [str(f) for f in files]
    embed_listing(load_model(checkpoint, CPU), listing, folder / "embedded", device=CPU)
    expected = store.read_embeddings(folder / "embedded").embeddings  # what `dcml embed` computes
    return {
        "params": params,
        "uri": params.tracking.mlflow_uri,
        "run_id": run_id,
        "ids": ids,
        "state": state,
        "checkpoint": checkpoint,
        "registered": registered,
        "files": files,
        "expected": expected,
        "log_seconds": log_seconds,
    }


def test_both_models_are_logged_once(logged):
    ids, state = logged["ids"], logged["state"]
    assert ids["model_id"] and ids["image_model_id"] and ids["model_id"] != ids["image_model_id"]
    saved = task_io.read_json(state)
    assert {"model", "image_model"} <= set(saved["done"])
    assert (saved["model_id"], saved["image_model_id"]) == (ids["model_id"], ids["image_model_id"])
    client = MlflowClient(logged["uri"])
    models = {
        m.name: m
        for m in client.search_logged_models(experiment_ids=[client.get_run(logged["run_id"]).info.experiment_id])
    }
    assert set(models) == {"model", "image-model"}
    assert models["image-model"].model_id == ids["image_model_id"]
    for model in models.values():  # (MLflow adds the run's params)
        assert {k: model.params[k] for k in ("num_learners", "seed")} == {"num_learners": "4", "seed": "0"}
    # a resumed flow repeats the task: nothing is logged twice
    previous = mlflow.get_tracking_uri()
    try:
        again = tracking.log_model.fn(logged["params"], logged["run_id"], str(logged["checkpoint"]), state)
    finally:
        mlflow.set_tracking_uri(previous)
    assert again == ids
    assert len(client.search_logged_models(experiment_ids=[models["model"].experiment_id])) == 2


def test_image_model_signature_and_metadata(logged):
    info = _uri(logged, f"models:/{logged['ids']['image_model_id']}")
    inputs = info.signature.inputs.to_dict()
    assert inputs == [{"type": "binary", "name": "image", "required": True}]
    (output,) = info.signature.outputs.inputs
    assert output.type == np.dtype("float32") and output.shape == (-1, 32)
    assert info.metadata == {"num_slices": load_model(logged["checkpoint"]).embedder.num_slices, "dimension": 32}
    assert info.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.model"


def test_best_alias_is_the_image_model(logged):
    client = MlflowClient(logged["uri"], registry_uri=logged["uri"])
    version = client.get_model_version_by_alias("dcml-demo", tracking.BEST_ALIAS)
    assert logged["registered"]["version"] == version.version
    assert version.source == f"models:/{logged['ids']['image_model_id']}"
    assert version.run_id == logged["run_id"]
    assert {k: version.tags[k] for k in ("num_learners", "seed", "sweep_run_id", "recall_at_1")} == {
        "num_learners": "4",
        "seed": "0",
        "sweep_run_id": logged["run_id"],
        "recall_at_1": "0.500000",
    }


def test_pyfunc_embeds_image_bytes_as_dcml_embed(logged):
    """Same decoding, transform and batches as ``dcml embed``: bit-identical on the CPU."""
    model = _uri(logged, f"models:/{logged['ids']['image_model_id']}", mlflow.pyfunc.load_model)
    frame = pd.DataFrame({"image": [f.read_bytes() for f in logged["files"]]})
    output = model.predict(frame)
    assert isinstance(output, np.ndarray) and output.dtype == np.float32
    assert output.shape == logged["expected"].shape == (len(logged["files"]), 32)
    np.testing.assert_array_equal(output, logged["expected"])
    assert model.predict(frame.iloc[:0]).shape == (0, 32)


def test_unreadable_image_names_its_row(logged):
    model = _uri(logged, f"models:/{logged['ids']['image_model_id']}", mlflow.pyfunc.load_model)
    good = logged["files"][0].read_bytes()
    frame = pd.DataFrame({"image": [good, good, good[: len(good) // 2]]})
    with pytest.raises(MlflowException, match="row 2 of 'image': cannot read the image"):
        model.predict(frame)
    with pytest.raises(MlflowException, match="row 0 of 'image'"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))


def _uri(logged, uri, action=mlflow.models.get_model_info):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(logged["uri"])
    try:
        return action(uri)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def served(logged, tmp_path_factory):
    """``mlflow models serve -m models:/dcml-demo@best --env-manager local`` on 127.0.0.1,
    in a process group of its own (stopped as a whole)."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        # MLflow execs `uvicorn` by name: the venv's bin folder must be on PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "MLFLOW_TRACKING_URI": logged["uri"],
        "MLFLOW_REGISTRY_URI": logged["uri"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/dcml-demo@best"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping in 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "startup_seconds": time.monotonic() - started, "log": log}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_served_model_embeds_base64_images(logged, served):
    """What the README's curl sends: ``dataframe_split`` with the files' base64 text."""
    data = [[base64.b64encode(f.read_bytes()).decode("ascii")] for f in logged["files"]]
    status, answer = _post(served["url"], {"dataframe_split": {"columns": ["image"], "data": data}})
    assert status == 200, answer
    output = np.asarray(answer["predictions"], dtype=np.float32)  # float32 -> JSON -> float32 is exact
    # the server runs in another process (its own torch thread count): allow for that
    np.testing.assert_allclose(output, logged["expected"], rtol=0, atol=1e-6)
    records = [{"image": row[0]} for row in data[:2]]
    status, answer = _post(served["url"], {"dataframe_records": records})
    assert status == 200, answer
    np.testing.assert_allclose(np.asarray(answer["predictions"], np.float32), logged["expected"][:2], rtol=0, atol=1e-6)


def test_served_model_rejects_a_broken_image_naming_its_row(logged, served):
    good = base64.b64encode(logged["files"][0].read_bytes()).decode("ascii")
    broken = base64.b64encode(b"not an image").decode("ascii")
    status, answer = _post(served["url"], {"dataframe_split": {"columns": ["image"], "data": [[good], [broken]]}})
    assert status == 400
    assert "row 1 of 'image': cannot read the image" in answer["message"]
