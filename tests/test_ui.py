"""What a user sees in the Prefect and MLflow UIs after a sweep (issue 8): a flow graph
without per-epoch logging nodes, task tags and progress logs, artifacts; in MLflow the
logged model with the final metrics, a registered model with the alias ``best``, the
dataset input, source tags, the experiment kind, constants as params, named parent runs
and reuse of the runs when a rerun computes nothing. Real Prefect (ephemeral API) and
real MLflow (sqlite in a temporary folder)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import mlflow
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
)
from prefect.logging.handlers import APILogWorker
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.asyncutils import run_coro_as_sync

from dcml.config import ConfigError, load_params, to_dict
from tasks.provenance import data_version
from tests.conftest import REPO_ROOT, shrink


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a tiny run lasts seconds
    with prefect_test_harness(server_startup_timeout=120):
        yield
    os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")


@contextlib.contextmanager
def info_logs():
    """Run logs at INFO reach the API (conftest quiets prefect to WARNING)."""
    levels = {}
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        levels[name] = logging.getLogger(name).level
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def swept(prefect_api, tiny_demo_root, tmp_path_factory):
    from flows.sweep import sweep

    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, tracking_uri=uri)
    params = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, log_model=True))
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(to_dict(params)))
    client = mlflow.tracking.MlflowClient(uri)
    client.search_experiments()  # creating the database runs alembic, whose logging set-up resets logger levels
    with info_logs():
        result = sweep(str(params_path), str(folder / "outputs"))
    experiment = client.get_experiment_by_name("dcml-demo")
    return {
        "result": result,
        "folder": folder,
        "params": params,
        "params_path": params_path,
        "client": client,
        "experiment": experiment,
        "runs": {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])},
    }


def _read(call):
    async def read():
        async with get_client() as client:
            return await call(client)

    return run_coro_as_sync(read())


def flow_runs(name: str):
    return [r for r in _read(lambda c: c.read_flow_runs()) if r.name == name]


def task_runs(flow_run_id):
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    return _read(lambda c: c.read_task_runs(flow_run_filter=flow_filter, task_run_filter=TaskRunFilter()))


def log_lines(flow_run_id) -> list[str]:
    APILogWorker.drain_all(timeout=10)
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    return [log.message for log in _read(lambda c: c.read_logs(log_filter=log_filter))]


def test_flow_graph_has_no_node_per_logged_epoch(swept):
    (k4,) = flow_runs("dcml-K4-seed0")
    names = [run.name for run in task_runs(k4.id)]
    logging_nodes = [n for n in names if n.startswith(("log-", "start-tracking", "end-tracking"))]
    assert sorted(logging_nodes) == ["end-tracking-K4-seed0", "log-artifacts", "log-model", "start-tracking-K4-seed0"]
    # 3 epochs, K=4, re-clustering every epoch: init, 2 × (embed-train, cluster), 3 trains, 4 × (embed-test,
    # evaluate), summarize, and the four tracking tasks
    assert len(names) == 1 + 4 + 3 + 8 + 1 + 4


def test_task_tags_and_progress_logs(swept):
    (k4,) = flow_runs("dcml-K4-seed0")
    assert {"dcml", "K4", "seed0"} <= set(k4.tags)
    by_name = {run.name: run for run in task_runs(k4.id)}
    assert {"dcml", "K4", "seed0", "train"} <= set(by_name["train-epochs-0-0"].tags)
    assert "cluster" in by_name["cluster-epoch-1"].tags and "tracking" in by_name["log-model"].tags
    lines = log_lines(k4.id)
    assert any(line.startswith("epoch 0 (divide): loss ") and "img/s" in line for line in lines), lines
    assert any(line.startswith("division 1: 4 clusters, images per learner [") for line in lines)
    assert any("images dropped" in line for line in lines)
    assert any(line.startswith("epoch 3: recall@1 ") for line in lines)
    assert any(line.startswith("K4-seed0 finished: recall@1 ") and "MLflow run" in line for line in lines)
    (sweep_run,) = flow_runs("sweep")
    assert any("has the alias 'best'" in line for line in log_lines(sweep_run.id))


def test_prefect_artifacts(swept):
    keys = ["dcml-sweep-comparison", "dcml-k1-seed0", "dcml-k4-seed0"]
    found = _read(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys))))
    by_key = {a.key: a for a in found}
    assert set(by_key) == set(keys)
    assert by_key["dcml-sweep-comparison"].type == "table"
    assert "K4-seed0" in str(by_key["dcml-sweep-comparison"].data)
    k4 = by_key["dcml-k4-seed0"]
    assert k4.type == "markdown"
    assert swept["runs"]["K4-seed0"].info.run_id in k4.data and "| recall@1 |" in k4.data
    assert "## Divisions (images per learner)" in k4.data
    assert "No divisions" in by_key["dcml-k1-seed0"].data


def test_logged_model_carries_the_final_metrics(swept):
    client, run = swept["client"], swept["runs"]["K4-seed0"]
    model_id = run.outputs.model_outputs[0].model_id
    assert run.outputs.model_outputs[0].step == 3
    model = client.get_logged_model(model_id)
    final = {m.key: m for m in model.metrics}
    assert final["test/recall_at_1"].step == 3
    history = client.get_metric_history(run.info.run_id, "test/recall_at_1")
    assert final["test/recall_at_1"].value == pytest.approx(max(history, key=lambda m: m.step).value)


def test_registered_model_alias_points_at_the_best_k(swept):
    client = swept["client"]
    version = client.get_model_version_by_alias("dcml-demo", "best")
    runs = swept["runs"]
    recall = {name: runs[name].data.metrics["test/recall_at_1"] for name in ("K1-seed0", "K4-seed0")}
    best = max(recall, key=lambda name: (recall[name], -int(name[1])))
    assert version.run_id == runs[best].info.run_id
    experiment = runs[best].info.experiment_id
    run_filter = f"source_run_id='{runs[best].info.run_id}' AND name='image-model'"
    (image_model,) = client.search_logged_models([experiment], filter_string=run_filter)
    assert version.source == f"models:/{image_model.model_id}"  # the model that takes images
    assert version.tags["num_learners"] == best[1]


def test_dataset_input_source_tags_and_experiment_kind(swept):
    run, params = swept["runs"]["K4-seed0"], swept["params"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == data_version(params.data).removeprefix("dvc:")
    assert dataset_input.dataset.name == "demo"
    assert not any(key.startswith("data/") for key in run.data.metrics)  # constants are no metric charts
    assert run.data.params["data_counts.images_skipped"] == "0"
    assert int(run.data.params["data_counts.train_images"]) > 0
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "dcml" and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["prefect.flow_run_name"] == "dcml-K4-seed0"
    assert swept["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)


def test_parent_run_is_named_and_carries_the_summary(swept):
    (parent,) = [r for name, r in swept["runs"].items() if name.startswith("sweep-")]
    assert parent.info.run_name.startswith("sweep-K1,4-seeds0-")
    assert "K4/recall_at_1_mean" in parent.data.metrics
    assert swept["runs"]["K4-seed0"].data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_rerun_with_nothing_to_compute_reuses_the_mlflow_runs(swept):
    from flows.sweep import sweep

    client, experiment = swept["client"], swept["experiment"]
    before = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
    versions = len(client.search_model_versions("name='dcml-demo'"))
    sweep(str(swept["params_path"]), str(swept["folder"] / "outputs"))
    after = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in after} == before
    assert all(r.info.status == "FINISHED" for r in after)
    assert len(client.search_model_versions("name='dcml-demo'")) == versions


def test_a_task_that_finds_its_output_says_so(swept):
    from flows.divide_and_conquer import divide_and_conquer

    k4 = Path(swept["result"]["runs"]["K4-seed0"])
    (k4 / "history" / "eval-epoch-0003.json").unlink()  # the final test embeddings stay
    with info_logs():
        divide_and_conquer(str(swept["params_path"]), 4, 0, str(swept["folder"] / "outputs"))
    latest = max(flow_runs("dcml-K4-seed0"), key=lambda r: r.start_time)
    expected = f"embed-test-epoch-3: output exists ({k4 / 'embeddings' / 'test-epoch-0003.parquet'}), skipped"
    assert expected in log_lines(latest.id)


def test_deploy_timezone_is_checked_before_any_server():
    from flows.cli import parser
    from flows.deploy import check_timezone, deploy_sweep

    assert parser().parse_args(["deploy"]).timezone == "UTC"
    check_timezone("Europe/Berlin")
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        deploy_sweep(cron="0 2 * * *", timezone="Mars/Olympus")
