"""dcml embed / index build / index eval / search / serve on a tiny generated dataset,
checked against brute force (numpy) and dcml.metrics, and each bad input exits 2."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dcml.config import load_params
from dcml.metrics import evaluate_retrieval
from dcml.retrieval import store
from dcml.retrieval.index import load_index_folder
from dcml.trainer import Trainer
from flows.cli import main
from tests.conftest import REPO_ROOT, shrink


def _checkpoint(tiny_demo_root: Path, path: Path, learners: str = "slices", hierarchical: bool = False) -> Path:
    """An untrained (seeded) model of the tiny params; masks get random values so that
    every learner's sub-space differs."""
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root)
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, learners=learners),
        eval=dataclasses.replace(params.eval, batch_size=16),
    )
    trainer = Trainer.create(params, 10, torch.device("cpu"), load_pretrained=False)
    if trainer.model.masks is not None:
        with torch.no_grad():
            trainer.model.masks.weight.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return trainer.save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_demo_root):
    """A checkpoint per learner kind, the tiny demo embedded with the slices one, its Flat index."""
    folder = tmp_path_factory.mktemp("retrieval")
    slices = _checkpoint(tiny_demo_root, folder / "slices.pt")
    masks = _checkpoint(tiny_demo_root, folder / "masks.pt", "masks")
    emb, idx = folder / "emb", folder / "idx"
    assert main(["embed", str(slices), str(tiny_demo_root), "--out", str(emb), "--num-workers", "0"]) == 0
    assert main(["index", "build", str(emb), "--out", str(idx)]) == 0
    return {"folder": folder, "slices": slices, "masks": masks, "emb": emb, "idx": idx, "root": tiny_demo_root}


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


def test_embedding_folder_schema_and_labels(workspace):
    embeddings = store.read_embeddings(workspace["emb"])
    images = _images(workspace["root"])
    assert len(embeddings) == len(images) and embeddings.info["num_unreadable"] == 0
    assert embeddings.paths == [str(p) for p in images]
    assert embeddings.labels == [p.parent.name for p in images]
    assert embeddings.embeddings.dtype == np.float32 and embeddings.embeddings.shape[1] == 32
    assert embeddings.info["model"]["num_slices"] == 4  # epoch 0 of K=4 slices: the schedule's K slices
    import hashlib

    assert embeddings.sha256[0] == hashlib.sha256(images[0].read_bytes()).hexdigest()


def test_embeddings_equal_the_model_applied_directly(workspace):
    """The stored rows are the model's test embedding of each file under the eval transform."""
    from dcml.inference import load_model

    model = load_model(workspace["slices"])
    embeddings = store.read_embeddings(workspace["emb"])
    from dcml.data.folder import load_image

    batch = torch.stack([model.transform(load_image(p)) for p in embeddings.paths[:16]])
    with torch.no_grad():
        direct = model.embedder(batch).numpy()
    np.testing.assert_array_equal(embeddings.embeddings[:16], direct)


def test_flat_index_eval_equals_dcml_metrics(workspace, tmp_path):
    out = tmp_path / "metrics.json"
    assert main(["index", "eval", str(workspace["idx"]), "--queries", str(workspace["emb"]), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    embeddings = store.read_embeddings(workspace["emb"])
    reference = evaluate_retrieval(embeddings.embeddings, np.array(embeddings.labels), [1, 2, 4, 8], with_nmi=False)
    for name, value in reference.items():
        assert result[name] == value, name
    assert result["same_set"] is True and "neighbor_recall@1" not in result


def test_approximate_index_reports_neighbour_recall(workspace, tmp_path):
    idx = tmp_path / "hnsw"
    assert main(["index", "build", str(workspace["emb"]), "--out", str(idx), "--factory", "HNSW8,Flat"]) == 0
    out = tmp_path / "metrics.json"
    assert (
        main(["index", "eval", str(idx), "--queries", str(workspace["emb"]), "--k", "1", "4", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert 0.5 <= result["neighbor_recall@4"] <= 1.0
    assert result["recall@1_diff_vs_exact"] == pytest.approx(result["recall@1"] - result["exact_recall@1"])
    # the exact reference is the Flat evaluation
    embeddings = store.read_embeddings(workspace["emb"])
    reference = evaluate_retrieval(embeddings.embeddings, np.array(embeddings.labels), [1, 4], with_nmi=False)
    assert result["exact_recall@1"] == reference["recall@1"] and result["exact_map@r"] == reference["map@r"]


def test_ivf_search_parameters_are_recorded_and_can_be_overridden(workspace, tmp_path, capsys):
    """nprobe = every list is exact search; the recorded parameters apply by default."""
    idx, emb = tmp_path / "ivf", str(workspace["emb"])
    build = ["index", "build", emb, "--out", str(idx), "--factory", "IVF4,Flat", "--search-params", "nprobe=4"]
    assert main(build) == 0
    assert load_index_folder(idx).info["search_parameters"] == "nprobe=4"
    capsys.readouterr()
    assert main(["index", "eval", str(idx), "--queries", emb, "--k", "1", "4", "--no-mlflow"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert exact["neighbor_recall@4"] == 1.0 and exact["recall@1_diff_vs_exact"] == 0.0
    assert main(["index", "eval", str(idx), "--queries", emb, "--k", "4", "--search-params", "nprobe=1"]) == 0
    one_list = json.loads(capsys.readouterr().out)
    assert one_list["search_parameters"] == "nprobe=1" and one_list["neighbor_recall@4"] < 1.0
    _fails(["index", "build", emb, "--out", str(tmp_path / "flat"), "--search-params", "nprobe=4"], capsys, "nprobe=4")


def test_search_finds_the_query_image_first(workspace, capsys):
    image = _images(workspace["root"])[5]
    assert main(["search", str(workspace["idx"]), "--image", str(image), "-k", "3"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["path"] == str(image) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["label"] == image.parent.name and hits[0]["id"] == 5


@pytest.mark.parametrize("learners", ["slices", "masks"])
def test_learner_search_equals_brute_force_in_that_subspace(workspace, learners, tmp_path, capsys):
    checkpoint = workspace[learners]
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", str(checkpoint), str(workspace["root"]), "--out", str(emb), "--num-workers", "0"]) == 0
    assert main(["index", "build", str(emb), "--out", str(idx), "--factory", "HNSW8,Flat"]) == 0
    trainer = Trainer.for_inference(checkpoint, torch.device("cpu"))
    from dcml.data.folder import load_image
    from dcml.inference import load_model

    transform = load_model(checkpoint).transform
    images = _images(workspace["root"])
    batch = torch.stack([transform(load_image(p)) for p in images])
    learner = 2
    with torch.no_grad():  # the learner's own output: slice or mask of the raw embedding, normalised
        space = trainer.model(batch, num_learners=4, learner=learner).numpy()
    query = images[7]
    expected = np.argsort(-(space @ space[7]), kind="stable")[:5]
    capsys.readouterr()
    assert main(["search", str(idx), "--image", str(query), "-k", "5", "--learner", str(learner)]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["id"] for h in hits] == expected.tolist()
    np.testing.assert_allclose([h["score"] for h in hits], (space @ space[7])[expected], atol=1e-5)
    full = load_index_folder(idx).info["learners"]
    assert len(full) == 4 and full[0]["kind"] == ("slice" if learners == "slices" else "mask")


def test_search_with_embedding_file(workspace, tmp_path, capsys):
    embeddings = store.read_embeddings(workspace["emb"])
    np.save(tmp_path / "q.npy", embeddings.embeddings[3])
    assert main(["search", str(workspace["idx"]), "--embedding", str(tmp_path / "q.npy"), "-k", "1"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["id"] == 3 and hit["score"] == pytest.approx(1.0, abs=1e-5)


def test_unreadable_images_are_listed_not_fatal(workspace, tmp_path):
    folder = tmp_path / "images" / "someclass"
    folder.mkdir(parents=True)
    good = _images(workspace["root"])[:3]
    for i, path in enumerate(good):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(good[0].read_bytes()[:60])  # truncated
    out = tmp_path / "emb"
    assert main(["embed", str(workspace["slices"]), str(tmp_path / "images"), "--out", str(out)]) == 0
    embeddings = store.read_embeddings(out)
    assert len(embeddings) == 3 and embeddings.info["num_unreadable"] == 1
    lines = (out / "unreadable.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(folder / "broken.png") + "\t")
    assert embeddings.ids.tolist() == [0, 1, 2]  # "broken.png" sorts last: id 3 has no row


@pytest.mark.slow  # three `dcml embed` processes
def test_killed_embed_resumes_to_the_same_files(workspace, tmp_path):
    """kill -9 after the first shards; the rerun keeps them and ends with the files of an
    uninterrupted run (shard size 16 = one batch: many shards)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    command = [sys.executable, "-m", "flows.cli", "embed", str(workspace["slices"]), str(workspace["root"])]
    options = ["--shard-size", "16", "--num-workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([*command, "--out", str(whole), *options], check=True, env=env, capture_output=True)
    process = subprocess.Popen([*command, "--out", str(killed), *options], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not store.shard_path(killed, 2).exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "info.json").exists(), "the run finished before it was killed"
    done = sorted((killed / "shards").glob("part-*.parquet"))
    before = {p.name: p.stat().st_mtime_ns for p in done}
    subprocess.run([*command, "--out", str(killed), *options], check=True, env=env, capture_output=True)
    for name, mtime in before.items():  # kept, not recomputed
        assert (killed / "shards" / name).stat().st_mtime_ns == mtime
    for path in sorted((whole / "shards").glob("*.parquet")):
        assert path.read_bytes() == (killed / "shards" / path.name).read_bytes()
    assert store.read_info(killed)["digest"] == store.read_info(whole)["digest"]


def test_serve_answers_knn_and_health(workspace):
    from fastapi.testclient import TestClient

    from flows.cli_retrieval import searcher_for
    from flows.serve import create_app

    client = TestClient(create_app(searcher_for(str(workspace["idx"]), "cpu", True, "params.yaml")))
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["count"] == len(_images(workspace["root"]))
    image = _images(workspace["root"])[9]
    answer = client.post("/knn", json={"image": base64.b64encode(image.read_bytes()).decode(), "k": 2}).json()
    assert answer["neighbors"][0]["id"] == 9 and answer["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    embeddings = store.read_embeddings(workspace["emb"])
    batch = client.post("/knn", json={"embeddings": embeddings.embeddings[:2].tolist(), "k": 1, "learner": 1}).json()
    assert [r[0]["id"] for r in batch["results"]] == [0, 1]
    bad = client.post("/knn", json={"image": "not base64!"})
    assert bad.status_code == 400 and "base64" in bad.json()["detail"]
    unreadable = client.post("/knn", json={"image": base64.b64encode(b"not an image").decode()})
    assert unreadable.status_code == 400 and "cannot read query image" in unreadable.json()["detail"]
    wrong = client.post("/knn", json={"embedding": [0.1, 0.2]})
    assert wrong.status_code == 400 and "dimension" in wrong.json()["detail"]


# --- bad input: one message naming the thing, exit 2, nothing that looks complete ----------


def _fails(args: list[str], capsys, *needles: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    error = capsys.readouterr().err
    for needle in needles:
        assert needle in error, error


def test_bad_inputs_exit_2_naming_them(workspace, tmp_path, capsys, monkeypatch):
    ckpt, emb, idx = str(workspace["slices"]), str(workspace["emb"]), workspace["idx"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _fails(
        ["embed", "models:/nope@best", str(workspace["root"]), "--out", str(tmp_path / "a")],
        capsys,
        "models:/nope@best",
    )
    _fails(
        ["embed", str(tmp_path / "missing.pt"), str(workspace["root"]), "--out", str(tmp_path / "a")],
        capsys,
        "missing.pt",
    )
    _fails(["embed", ckpt, str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")], capsys, "nowhere")
    (tmp_path / "empty").mkdir()
    _fails(["embed", ckpt, str(tmp_path / "empty"), "--out", str(tmp_path / "c")], capsys, "no image files", "empty")
    assert not (tmp_path / "c" / "info.json").exists()
    # an index and queries of different models
    other = _checkpoint(workspace["root"], tmp_path / "other.pt", "masks")
    other_emb = tmp_path / "other-emb"
    assert main(["embed", str(other), str(workspace["root"]), "--out", str(other_emb)]) == 0
    _fails(["index", "eval", str(idx), "--queries", str(other_emb)], capsys, "another model", str(idx))
    # a damaged index file
    damaged = tmp_path / "damaged"
    assert main(["index", "build", emb, "--out", str(damaged)]) == 0
    index_file = damaged / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:100])
    _fails(["search", str(damaged), "--embedding", str(other_emb)], capsys, str(index_file))
    _fails(["index", "build", emb, "--out", str(tmp_path / "f"), "--factory", "Nonsense7"], capsys, "Nonsense7")
    assert not (tmp_path / "f").exists()
    _fails(["index", "build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g")], capsys, "nowhere")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    _fails(["search", str(idx), "--image", str(tmp_path / "bad.png")], capsys, "bad.png")
    np.save(tmp_path / "q.npy", np.ones(7, np.float32))
    _fails(["search", str(idx), "--embedding", str(tmp_path / "q.npy")], capsys, "dimension")
    _fails(["search", str(idx), "--embedding", emb, "--learner", "9"], capsys, "--learner 9")
    # a folder that holds another model's embeddings is not overwritten
    _fails(["embed", str(other), str(workspace["root"]), "--out", emb], capsys, emb, "another model")
    _fails(["index", "eval", str(tmp_path / "g"), "--queries", emb], capsys, "not found")
