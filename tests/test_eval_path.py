"""One evaluation path: the pipeline's evaluation, `dcml evaluate` and the logged MLflow model
give the same test embedding — and the same numbers — for the same checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from dcml.config import ConfigError, load_params, to_dict
from dcml.data import build_bundle, load_splits
from dcml.evaluate import checkpoint_test_slices
from dcml.inference import TestEmbedder
from dcml.metrics import NMI_AVERAGE_METHOD
from dcml.trainer import Trainer
from flows.cli import main
from tasks import io
from tasks.layout import RunLayout
from tests.conftest import REPO_ROOT, shrink

METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi", "num_slices"]


def replace(params, **sections):
    """``params`` with fields of its sections replaced: ``replace(p, cluster={"num_learners": 2})``."""
    return dataclasses.replace(
        params, **{name: dataclasses.replace(getattr(params, name), **values) for name, values in sections.items()}
    )


# -- the one decision ---------------------------------------------------------------------


def test_checkpoint_test_slices_follow_the_segment_that_ends_at_the_epoch(tiny_params):
    # tiny_params: K=4, 3 epochs, divide until 2, K=1 from 2, evaluation every epoch
    p = replace(tiny_params, eval={"every_epochs": 1})
    assert [checkpoint_test_slices(p, epoch) for epoch in range(4)] == [4, 4, 4, 1]  # untrained, divide, finetune
    slices = replace(p, eval={"embedding": "slices"})
    assert [checkpoint_test_slices(slices, epoch) for epoch in range(4)] == [4, 4, 4, 4]
    full = replace(p, eval={"embedding": "full"})
    assert [checkpoint_test_slices(full, epoch) for epoch in range(4)] == [1, 1, 1, 1]
    # clustered batches with the full-embedding loss (epoch 1-2) are evaluated on the full embedding
    clustered_full = replace(p, cluster={"divide_until_epoch": 1, "finetune_from_epoch": 3})
    assert [checkpoint_test_slices(clustered_full, epoch) for epoch in range(4)] == [4, 4, 1, 1]
    # epoch 0 is the first segment's: never divided -> never sliced under "schedule"
    never_divided = replace(p, cluster={"divide_until_epoch": 0, "finetune_from_epoch": 0})
    assert checkpoint_test_slices(never_divided, 0) == 1
    baseline = replace(p, cluster={"num_learners": 1})
    assert [checkpoint_test_slices(baseline, epoch) for epoch in range(4)] == [1, 1, 1, 1]
    with pytest.raises(ConfigError, match="outside the run's 3 epochs"):
        checkpoint_test_slices(p, 4)


def test_masks_have_no_slices(tiny_params):
    for embedding in ("schedule", "slices"):
        masks = replace(tiny_params, model={"learners": "masks"}, eval={"embedding": embedding})
        assert [checkpoint_test_slices(masks, epoch) for epoch in range(4)] == [1, 1, 1, 1]


# -- the pipeline vs `dcml evaluate` vs the logged model ----------------------------------


def train(folder: Path, params) -> RunLayout:  # noqa: ANN001
    """`dcml train` of ``params`` under ``folder``; every checkpoint is kept."""
    folder.mkdir()
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(params)))
    assert main(["train", "--params", str(path), "--out", str(folder / "out")]) == 0
    (run,) = (folder / "out" / "runs").iterdir()
    return RunLayout(run)


@pytest.fixture(scope="module")
def runs(tiny_demo_root, tmp_path_factory):
    """Two K=4 runs: 2 epochs (divide epoch 0, K=1 epoch 1) under ``eval.embedding: schedule``,
    all checkpoints kept; 1 epoch of K=1 fine-tuning under ``slices``, its model logged
    to MLflow (the test embedding of a fine-tuned model has 4 slices there)."""
    folder = tmp_path_factory.mktemp("eval-path")
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{folder / 'mlflow.db'}")
    params = replace(
        params,
        train={"epochs": 2, "keep_checkpoints": 3},
        cluster={"divide_until_epoch": 1, "finetune_from_epoch": 1},
        eval={"every_epochs": 1},
    )
    schedule = train(folder / "schedule", params)
    slices = replace(
        params,
        train={"epochs": 1},
        cluster={"divide_until_epoch": 0, "finetune_from_epoch": 0},
        eval={"embedding": "slices"},
        tracking={"log_model": True},
    )
    slices = train(folder / "slices", slices)
    return {"schedule": schedule, "slices": slices, "params": params}


def cli_evaluate(checkpoint: Path, capsys, *extra: str) -> dict:  # noqa: ANN001
    capsys.readouterr()  # drop what came before
    assert main(["evaluate", str(checkpoint), "--device", "cpu", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("run", "epoch", "slices"),
    [("schedule", 0, 4), ("schedule", 1, 4), ("schedule", 2, 1), ("slices", 1, 4)],
    ids=["untrained", "divide-phase", "finetuned", "slices-finetuned"],
)
def test_dcml_evaluate_reports_the_pipelines_numbers(runs, capsys, run, epoch, slices):
    layout = runs[run]
    written = io.read_json(layout.evaluation(epoch))
    printed = cli_evaluate(layout.checkpoint(epoch), capsys)
    assert written["num_slices"] == printed["num_slices"] == slices
    assert printed["epoch"] == epoch
    assert {k: printed[k] for k in METRICS} == pytest.approx({k: written[k] for k in METRICS}, abs=1e-6)
    assert printed["nmi_average_method"] == NMI_AVERAGE_METHOD == "arithmetic"


def test_an_explicit_num_learners_still_overrides(runs, capsys):
    checkpoint = runs["schedule"].checkpoint(1)  # divide phase: its own test embedding has 4 slices
    written = io.read_json(runs["schedule"].evaluation(1))
    full = cli_evaluate(checkpoint, capsys, "--num-learners", "1")
    assert full["num_slices"] == 1
    # the full embedding of a divided model ranks differently: the comparison above can fail
    assert full["map@r"] != pytest.approx(written["map@r"], abs=1e-6)


def test_inference_module_is_the_test_embedding(runs):
    params = runs["params"]
    bundle = build_bundle(load_splits(params.data), params.data)
    images = torch.stack([bundle.test[i][0] for i in range(24)])
    for layout, epoch, slices in [(runs["schedule"], 1, 4), (runs["schedule"], 2, 1), (runs["slices"], 1, 4)]:
        module = TestEmbedder.from_checkpoint(layout.checkpoint(epoch))
        assert module.num_slices == slices
        trainer = Trainer.for_inference(layout.checkpoint(epoch), torch.device("cpu"))
        expected, _, indices = trainer.embed(bundle.test, num_learners=slices)
        assert list(indices[:24]) == list(range(24))
        with torch.no_grad():
            np.testing.assert_allclose(module(images).numpy(), expected[:24], rtol=1e-5, atol=1e-6)


def test_logged_model_is_the_checkpoints_test_embedding(runs):
    """The slices run's final model is fine-tuned but evaluated on its 4 slices: so is the MLflow model."""
    layout = runs["slices"]
    run_id = io.read_json(layout.tracking_state)["run_id"]
    uri, previous = f"runs:/{run_id}/model", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(runs["params"].tracking.mlflow_uri)
    try:
        assert mlflow.models.get_model_info(uri).metadata["num_slices"] == 4
        logged = mlflow.pytorch.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
    size = runs["params"].data.image_size
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32))
    module = TestEmbedder.from_checkpoint(layout.checkpoint(1))
    with torch.no_grad():
        expected = module(images).numpy()
        np.testing.assert_allclose(logged(images).numpy(), expected, rtol=1e-5, atol=1e-6)
        one_slice = module.model(images, num_learners=1).numpy()
    assert not np.allclose(expected, one_slice, atol=1e-4)  # what was logged before: a different embedding


@pytest.fixture(scope="module")
def tpami_run(tiny_demo_root, tmp_path_factory):
    """K=4 with masks and hierarchical division through the Prefect flow: divisions of
    1, 2 and 4 clusters at epochs 0, 1, 2; the model logged to MLflow."""
    folder = tmp_path_factory.mktemp("tpami")
    params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root, f"sqlite:///{folder / 'mlflow.db'}")
    params = replace(
        params,
        model={"learners": "masks"},
        cluster={"hierarchical": True, "divide_until_epoch": 3, "finetune_from_epoch": 3},
        eval={"every_epochs": 3},
        tracking={"log_model": True},
    )
    return train(folder / "run", params), params


def test_a_tpami_run_through_the_flow_grows_its_divisions_and_evaluates_like_dcml_evaluate(tpami_run, capsys):
    layout, params = tpami_run
    sizes = [io.read_division(layout.division(epoch)).num_clusters for epoch in range(3)]
    assert sizes == [1, 2, 4]
    assert io.read_division(layout.division(2)).stats["learner_kept"] > 0.5  # children stay in their parent
    assert (layout.plots / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"
    written = io.read_json(layout.evaluation(3))
    printed = cli_evaluate(layout.checkpoint(3), capsys)
    assert written["num_slices"] == printed["num_slices"] == 1  # masks: the full embedding
    assert {k: printed[k] for k in METRICS} == pytest.approx({k: written[k] for k in METRICS}, abs=1e-6)
    stats = [io.read_json(layout.epoch_stats(epoch)) for epoch in range(3)]
    assert stats[0]["mask_penalty"] == 0.0 and stats[1]["mask_penalty"] > 0  # one mask, then two
