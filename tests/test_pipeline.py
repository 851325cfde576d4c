"""End to end with the real components: Prefect (ephemeral API, own PREFECT_HOME), MLflow
(own sqlite file), and the files a run leaves on disk (Parquet, checkpoints, plots)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.asyncutils import run_coro_as_sync

from dcml.config import to_dict
from tasks import io
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT, shrink


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def sweep_result(prefect_api, tiny_demo_root, tmp_path_factory):
    from dcml.config import load_params
    from flows.sweep import sweep

    folder = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, tracking_uri=uri)
    params = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, log_model=True))
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(to_dict(params)))
    result = sweep(str(params_path), str(folder / "outputs"))
    return {"result": result, "folder": folder, "uri": uri, "params_path": params_path}


def task_run_names(flow_run_id) -> list[str]:
    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(),
            )
            return [r.name for r in runs]

    return run_coro_as_sync(read())


def flow_runs():
    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    return run_coro_as_sync(read())


def test_sweep_runs_k1_and_k4_as_prefect_subflows_of_discrete_tasks(sweep_result):
    runs = {r.name: r for r in flow_runs()}
    assert {"dcml-K1-seed0", "dcml-K4-seed0"} <= runs.keys()
    assert all(r.state.is_completed() for r in runs.values())
    k4 = set(task_run_names(runs["dcml-K4-seed0"].id))
    assert {
        "init-model",
        "embed-train-epoch-0",
        "cluster-epoch-0",
        "train-epochs-0-0",
        "cluster-epoch-1",
        "train-epochs-1-1",
        "train-epochs-2-2",
        "embed-test-epoch-3",
        "evaluate-epoch-3",
    } <= k4
    k1 = set(task_run_names(runs["dcml-K1-seed0"].id))
    assert not any(name.startswith("cluster-") for name in k1)  # the baseline never clusters


def test_run_files_parquet_and_plots(sweep_result):
    result, folder = sweep_result["result"], sweep_result["folder"]
    assert set(result["runs"]) == {"K1-seed0", "K4-seed0"}
    k4 = Path(result["runs"]["K4-seed0"])
    embeddings, labels, indices, meta = io.read_embeddings(k4 / "embeddings" / "test-epoch-0003.parquet")
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(labels), 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert meta["split"] == "test" and sorted(indices.tolist()) == list(range(len(labels)))
    division = io.read_division(k4 / "divisions" / "division-epoch-0001.parquet")
    assert division.num_clusters == 4 and set(np.unique(division.assignment)) == {0, 1, 2, 3}
    for name in ("recall_curve.png", "cluster_sizes.png", "retrieval_grid.png"):
        assert (k4 / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    metrics = io.read_json(folder / "outputs" / "metrics.json")
    assert set(metrics) == {"K1-seed0", "K4-seed0", "summary", "vs_K1"} and 0 < metrics["K4-seed0"]["recall@1"] <= 1
    assert "| K4-seed0 | 4 | 0 |" in (folder / "outputs" / "comparison.md").read_text()
    assert (folder / "outputs" / "plots" / "recall_vs_k.png").exists()
    assert not list(folder.rglob("*.tmp"))  # atomic writes leave no temp files


def test_mlflow_parent_run_with_one_child_per_k(sweep_result):
    client = mlflow.tracking.MlflowClient(sweep_result["uri"])
    experiment = client.get_experiment_by_name("dcml-demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name.startswith("sweep-K1,4-seeds0-")]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"K1-seed0", "K4-seed0"}
    k4 = children["K4-seed0"]
    assert k4.info.status == "FINISHED"
    assert k4.data.params["cluster.num_learners"] == "4" and k4.data.params["train.epochs"] == "3"
    assert {"git_commit", "dataset_version", "dcml.source_digest", "mlflow.source.git.commit"} <= k4.data.tags.keys()
    recall = client.get_metric_history(k4.info.run_id, "test/recall_at_1")
    assert [m.step for m in recall] == [0, 1, 2, 3]
    assert len(client.get_metric_history(k4.info.run_id, "train/images_per_second")) == 3
    assert client.get_metric_history(k4.info.run_id, "division/size_entropy")
    assert client.get_metric_history(k4.info.run_id, "division/images_dropped")
    assert client.get_metric_history(k4.info.run_id, "division/nmi_to_previous")
    assert k4.data.params["data_counts.images_skipped"] == "0"  # constants: params, not metric charts
    artifacts = {a.path for a in client.list_artifacts(k4.info.run_id)}
    assert {"plots", "divisions", "embeddings", "metrics"} <= artifacts
    plots = {a.path for a in client.list_artifacts(k4.info.run_id, "plots")}
    assert "plots/retrieval_grid.png" in plots
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    assert len(models) >= 2


def test_finished_run_keeps_one_checkpoint_and_the_final_embeddings(sweep_result):
    """Retention (tasks/retention.py) with the default train.keep_checkpoints: 1."""
    for run in sweep_result["result"]["runs"].values():
        layout = RunLayout(Path(run))
        assert list(layout.checkpoints()) == [3]  # the final one; epochs 0-2 were deleted once consumed
        assert list(layout.embedding_files("test")) == [3]
        assert not layout.embedding_files("train")  # consumed by clustering
        assert sorted(layout.evaluations()) == [0, 1, 2, 3]  # small files stay
    k4 = RunLayout(Path(sweep_result["result"]["runs"]["K4-seed0"]))
    assert sorted(k4.divisions()) == [0, 1]


def test_rerun_after_a_crash_between_training_and_evaluation_resumes(sweep_result):
    from flows.divide_and_conquer import divide_and_conquer

    k4 = Path(sweep_result["result"]["runs"]["K4-seed0"])
    before = io.read_json(k4 / "metrics.json")
    kept = k4 / "checkpoints" / "epoch-0003.pt"
    kept_mtime = kept.stat().st_mtime_ns
    # a crash after the last checkpoint was written: evaluation and report never appeared
    for path in [k4 / "embeddings" / "test-epoch-0003.parquet", k4 / "history" / "eval-epoch-0003.json"]:
        path.unlink()
    (k4 / "metrics.json").unlink()
    shutil.rmtree(k4 / "plots")
    result = divide_and_conquer(str(sweep_result["params_path"]), 4, 0, str(sweep_result["folder"] / "outputs"))
    assert kept.stat().st_mtime_ns == kept_mtime  # finished work is not redone
    assert result["recall@1"] == before["recall@1"] and result["nmi"] == before["nmi"]
    assert (k4 / "plots" / "retrieval_grid.png").exists()


def test_final_model_is_the_last_epoch_never_selected_on_test(sweep_result, capsys):
    """The authors kept the epoch with the best *test* R@1; we report the last epoch."""
    from flows.cli import main

    k4 = Path(sweep_result["result"]["runs"]["K4-seed0"])
    last = io.read_json(k4 / "history" / "eval-epoch-0003.json")
    final = io.read_json(k4 / "metrics.json")
    assert final["epoch"] == 3 and final["recall@1"] == last["recall@1"]
    assert main(["evaluate", str(k4 / "checkpoints" / "epoch-0003.pt"), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epoch"] == 3 and printed["recall@1"] == pytest.approx(last["recall@1"])


# --- the trained model in use: dcml embed / index (tests/test_retrieval.py has the rest) -------


def test_embed_of_the_test_split_equals_the_pipelines_test_embedding(sweep_result, tmp_path):
    """Bit-identical on the CPU: same transform, same batches, same test embedding; and a
    Flat index over it evaluates exactly as the run's final evaluation."""
    from dcml.retrieval import store
    from flows.cli import main

    for name, run_dir in sweep_result["result"]["runs"].items():
        layout = RunLayout(Path(run_dir))
        emb, idx, out = tmp_path / f"{name}-emb", tmp_path / f"{name}-idx", tmp_path / f"{name}.json"
        assert main(["embed", run_dir, "--split", "test", "--out", str(emb), "--num-workers", "0"]) == 0
        stored, labels, indices, _ = io.read_embeddings(layout.embeddings("test", 3))
        ours = store.read_embeddings(emb)
        np.testing.assert_array_equal(ours.embeddings, stored)
        assert ours.ids.tolist() == indices.tolist()
        assert main(["index", "build", str(emb), "--out", str(idx)]) == 0
        assert main(["index", "eval", str(idx), "--queries", str(emb), "--out", str(out), "--no-mlflow"]) == 0
        through_index, final = json.loads(out.read_text()), io.read_json(layout.final_metrics)
        for metric in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"):
            assert through_index[metric] == final[metric], (name, metric)


def test_retrieval_flow_uses_the_best_model_and_logs_to_its_mlflow_run(sweep_result, tmp_path):
    from flows.retrieval import retrieval_chain

    best_file = sweep_result["folder"] / "outputs" / "best.json"
    best = json.loads(best_file.read_text())
    finals = {n: io.read_json(RunLayout(Path(d)).final_metrics) for n, d in sweep_result["result"]["runs"].items()}
    assert best["recall@1"] == max(m["recall@1"] for m in finals.values())
    result = retrieval_chain(str(best_file), str(tmp_path / "retrieval"), params_path=str(sweep_result["params_path"]))
    assert result["recall@1"] == best["recall@1"]
    assert json.loads((tmp_path / "retrieval" / "index-metrics.json").read_text())["recall@1"] == best["recall@1"]
    run = mlflow.tracking.MlflowClient(sweep_result["uri"]).get_run(best["mlflow_run_id"])
    assert run.data.metrics["index/recall_at_1"] == best["recall@1"]


def test_sweep_keeps_other_run_folders_unless_pruning(sweep_result):
    """A finished run of other params in the same OUT (as `dcml train` leaves it) survives a
    sweep; only --prune (what dvc.yaml passes) removes it."""
    from flows.sweep import sweep

    outputs = sweep_result["folder"] / "outputs"
    other = outputs / "runs" / "K2-seed5-0123abcd"
    shutil.copytree(sweep_result["result"]["runs"]["K1-seed0"], other)
    sweep(str(sweep_result["params_path"]), str(outputs))  # finished: recomputes nothing
    assert (other / "metrics.json").is_file()
    sweep(str(sweep_result["params_path"]), str(outputs), prune=True)
    assert not other.exists()
    assert all(Path(d).is_dir() for d in sweep_result["result"]["runs"].values())


def test_compare_reads_one_folder_and_writes_another(sweep_result, tmp_path, capsys):
    from flows.cli import main

    runs = sweep_result["folder"] / "outputs" / "runs"
    assert main(["compare", "--runs", str(runs), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.md").is_file()
    assert sorted(n.split("-")[0] for n in json.loads(capsys.readouterr().out)["runs"]) == ["K1", "K4"]
