"""One Divide-and-Conquer training run as a Prefect flow.

The flow walks the schedule of :func:`dcml.schedule.plan_from_params` and alternates
discrete tasks — ``embed-train-epoch-N`` → ``cluster-epoch-N`` → ``train-epochs-A-B`` →
``embed-test-epoch-M`` → ``evaluate-epoch-M`` — that exchange file paths. Every task
skips work whose output already exists, so rerunning after a crash resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from dcml.atomic import remove_stale_temp_files
from dcml.config import Params, load_params, to_dict, with_num_learners
from dcml.evaluate import test_slices
from dcml.schedule import plan_from_params
from tasks import report, tracking, training
from tasks.layout import RunLayout, params_digest, run_name
from tasks.runs import data_summary, validate_data, write_run_params

TRAIN_METRICS = ["loss", "seconds", "images_per_second"]


def run_folder(out_dir: str | Path, params: Params) -> Path:
    """``<out>/runs/K<k>-seed<s>-<params hash>``."""
    name = run_name(params.cluster.num_learners, params.seed)
    return Path(out_dir) / "runs" / f"{name}-{params_digest(to_dict(params))}"


@flow(name="divide-and-conquer", flow_run_name="dcml-K{num_learners}-seed{seed}")
def divide_and_conquer(
    params_path: str = "params.yaml",
    num_learners: int | None = None,
    seed: int | None = None,
    out_dir: str = "outputs",
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; returns its final metrics (also in ``<run>/metrics.json``).

    ``num_learners``/``seed`` override ``cluster.num_learners``/``seed`` of the params file.
    """
    params = load_params(params_path)
    if num_learners is not None or seed is not None:
        params = with_num_learners(params, params.cluster.num_learners if num_learners is None else num_learners, seed)
    validate_data(params)
    layout = RunLayout(run_folder(out_dir, params))
    write_run_params(params, layout)
    remove_stale_temp_files(layout.root)  # left by a run killed mid-write
    run_dir, name = str(layout.root), run_name(params.cluster.num_learners, params.seed)
    state = str(layout.tracking_state)
    run_id = tracking.start_run(params, name, state, parent_run_id)
    try:
        tracking.log_metrics(params, run_id, 0, _prefixed("data/", data_summary(params)), state)
        checkpoint = training.init_model(run_dir)
        test_embeddings = _evaluate(params, run_id, run_dir, state, checkpoint, 0, params.cluster.num_learners)
        division: str | None = None
        division_index = 0
        for segment in plan_from_params(params):
            if segment.mode == "finetune":
                division = None
            elif segment.recluster or division is None:
                embeddings = training.embed(run_dir, checkpoint, "train", segment.start_epoch, segment.num_learners)
                division = training.cluster(
                    run_dir, embeddings, division, segment.num_clusters, division_index, segment.start_epoch
                )
                division_index += 1
                tracking.log_metrics_from(params, run_id, segment.start_epoch, division, "division", state)
            checkpoint = training.train(run_dir, checkpoint, division, segment)
            for epoch in range(segment.start_epoch, segment.end_epoch):
                stats = str(layout.epoch_stats(epoch))
                tracking.log_metrics_from(params, run_id, epoch + 1, stats, "train", state, TRAIN_METRICS)
            test_embeddings = _evaluate(
                params, run_id, run_dir, state, checkpoint, segment.end_epoch, segment.num_learners
            )
        final = report.summarize_run(run_dir, name, test_embeddings)
        tracking.log_artifacts(
            params,
            run_id,
            {
                "plots": str(layout.plots),
                "divisions": str(layout.root / "divisions"),
                "history": str(layout.root / "eval_history.csv"),
                "history/train": str(layout.root / "train_history.csv"),
                "embeddings": test_embeddings,
                "metrics": str(layout.final_metrics),
            },
            state,
        )
        if params.tracking.log_model:
            tracking.log_model(params, run_id, checkpoint, state)
        tracking.end_run(params, run_id, name)
    except BaseException:
        tracking.mark_failed(params, run_id, name)
        raise
    return {**final, "run_dir": run_dir, "mlflow_run_id": run_id}


def _evaluate(params: Params, run_id: str, run_dir: str, state: str, checkpoint: str, epoch: int, learners: int) -> str:
    slices = test_slices(params.eval, learners, params.cluster.num_learners)
    embeddings = training.embed(run_dir, checkpoint, "test", epoch, slices)
    evaluation = training.evaluate(run_dir, embeddings, epoch)
    tracking.log_metrics_from(params, run_id, epoch, evaluation, "test", state)
    return embeddings


def _prefixed(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {prefix + k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
