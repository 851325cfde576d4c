"""One Divide-and-Conquer training run as a Prefect flow.

The flow walks :func:`dcml.schedule.steps_from_params` and alternates discrete tasks —
``embed-train-epoch-N`` → ``cluster-epoch-N`` → ``train-epochs-A-B`` →
``embed-test-epoch-M`` → ``evaluate-epoch-M`` — that exchange file paths.

Resume: the run folder is keyed on the params that change results (not on the code).
A rerun continues from the run's newest checkpoint: segments that end at or before it
are done (their divisions, epoch statistics and evaluations are on disk and are only
logged), the rest is computed. Tasks also skip work whose output exists, so a crash
between a task's output and the next task loses nothing. ``fresh`` starts over.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags

from dcml.atomic import remove_stale_temp_files
from dcml.config import ConfigError, Params, load_params, with_num_learners
from dcml.evaluate import checkpoint_test_slices
from dcml.schedule import steps_from_params
from tasks import artifacts, integrity, io, locks, provenance, report, retention, tracking, training
from tasks.layout import RunLayout, run_name
from tasks.runs import (
    check_environment,
    data_summary,
    reset_run,
    run_key,
    validate_data,
    write_run_params,
    write_skipped_files,
)

TRAIN_METRICS = ["loss", "seconds", "images_per_second"]


def run_folder(out_dir: str | Path, params: Params) -> Path:
    """``<out>/runs/K<k>-seed<s>-<hash of params, device type and data>`` (``tasks.runs.run_key``)."""
    name = run_name(params.cluster.num_learners, params.seed)
    return Path(out_dir) / "runs" / f"{name}-{run_key(params)}"


@flow(name="divide-and-conquer", flow_run_name="dcml-K{num_learners}-seed{seed}")
def divide_and_conquer(
    params_path: str = "params.yaml",
    num_learners: int | None = None,
    seed: int | None = None,
    out_dir: str = "outputs",
    parent_run_id: str | None = None,
    fresh: bool = False,
    wait: bool = False,
    result_file: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; returns its final metrics (also in ``<run>/metrics.json``).

    ``result_file``: where to write the returned dict as JSON too, for a caller that
    started this flow on a worker (``dcml sweep --deployment``, :mod:`flows.remote`).

    ``num_learners``/``seed`` override ``cluster.num_learners``/``seed`` of the params file.
    ``fresh`` deletes the run's folder first instead of continuing it. The run folder is
    owned by one process at a time (``tasks.locks``): when another one runs it, this run
    fails naming that process (:class:`~tasks.locks.BusyError`), or with ``wait`` waits
    for it to end and then continues (reusing what it finished).
    """
    params = load_params(params_path)
    if num_learners is not None or seed is not None:
        params = with_num_learners(params, params.cluster.num_learners if num_learners is None else num_learners, seed)
    check_environment(params)  # this machine's (a worker's) device and weights file
    validate_data(params)
    layout = RunLayout(run_folder(out_dir, params))
    # one process at a time: taken before anything in the folder is touched, held until the run ends
    with locks.hold(layout.lock, str(layout.root), wait, get_run_logger()):
        result = _run(params, layout, parent_run_id, fresh)
    if result_file:
        io.write_json(result_file, {**result, "run_dir": str(layout.root.resolve())})
    return result


def _run(params: Params, layout: RunLayout, parent_run_id: str | None, fresh: bool) -> dict[str, Any]:
    """The run, in a folder this process owns."""
    if fresh:
        reset_run(layout)
    steps, keep, logger = steps_from_params(params), params.train.keep_checkpoints, get_run_logger()
    # every file a rerun reads is checked: unreadable ones are moved aside and recomputed
    resume = integrity.recover(layout, steps, keep, logger, params)
    lost = integrity.lost_files(layout)  # a finished run's files that no checkpoint kept can recompute
    write_run_params(params, layout)
    remove_stale_temp_files(layout.root)  # left by a run killed mid-write
    if resume not in {None, 0, *(step.segment.end_epoch for step in steps)}:
        raise ConfigError(
            f"{layout.checkpoint(resume)} does not end a segment of the current schedule (the code changed how "
            "epochs are grouped since the run started); rerun with --fresh to start it over"
        )
    versions = provenance.record_code_version(layout, resume or 0)
    _log_resume(layout, resume, versions, params.train.epochs)
    run_dir, name = str(layout.root), run_name(params.cluster.num_learners, params.seed)
    state = str(layout.tracking_state)
    scope = ExitStack()  # closed in `finally`: tags on every task run of this run, system metrics
    scope.enter_context(tags(*artifacts.run_tags(params)))
    run_id = tracking.start_run(params, name, state, parent_run_id)
    try:
        scope.enter_context(tracking.system_metrics(params, run_id))
        counts = data_summary(params)
        tracking.log_dataset(params, run_id, counts, state)  # constants: dataset profile + params
        skipped_files = write_skipped_files(params, layout)
        if skipped_files is not None:
            logger.warning(
                "%s: %d unreadable images skipped (data.skip_corrupt), listed in %s",
                name,
                counts["images_skipped"],
                skipped_files,
            )
        if resume is None:
            checkpoint, resume = training.init_model(run_dir), 0
        else:
            checkpoint = str(layout.checkpoint(resume))
        _evaluate(params, layout, run_id, checkpoint, 0, resume, lost)
        division: str | None = None
        train_metrics = TRAIN_METRICS + (["mask_penalty"] if params.model.learners == "masks" else [])
        for step in steps:
            segment = step.segment
            if step.division == "all":
                division = None
            elif step.division == "new":
                path = layout.division(segment.start_epoch)
                if _to_compute(path, segment.start_epoch, resume, lost):
                    embeddings = training.embed(run_dir, checkpoint, "train", segment.start_epoch, step.cluster_slices)
                    training.cluster(
                        run_dir, embeddings, division, segment.num_clusters, step.division_index, segment.start_epoch
                    )
                division = str(path)
                if path not in lost:
                    tracking.log_metrics_from(params, run_id, segment.start_epoch, division, "division", state)
            if segment.end_epoch > resume:
                checkpoint = training.train(run_dir, checkpoint, division, segment)
            for epoch in range(segment.start_epoch, segment.end_epoch):
                stats = str(layout.epoch_stats(epoch))
                if layout.epoch_stats(epoch) not in lost:
                    tracking.log_metrics_from(params, run_id, epoch + 1, stats, "train", state, train_metrics)
            if step.evaluate:
                _evaluate(params, layout, run_id, checkpoint, segment.end_epoch, resume, lost)
        integrity.verify_final_checkpoint(layout, steps, keep, params.train.epochs, logger)
        test_embeddings = str(layout.embeddings("test", params.train.epochs))
        final = report.summarize_run(run_dir, name, test_embeddings)
        retention.prune_run(layout, params)  # also when all work was done
        tracking.log_artifacts(
            params,
            run_id,
            {
                "plots": str(layout.plots),
                "divisions": str(layout.root / "divisions"),
                "history": str(layout.root / "eval_history.csv"),
                "history/train": str(layout.root / "train_history.csv"),
                "history/code": str(layout.code_versions),
                "embeddings": test_embeddings,
                "metrics": str(layout.final_metrics),
                **(
                    {"data": str(layout.root / "skipped_files.txt")}
                    if (layout.root / "skipped_files.txt").exists()
                    else {}
                ),
            },
            state,
        )
        models = tracking.log_model(params, run_id, checkpoint, state) if params.tracking.log_model else {}
        model_id = models.get("model_id")
        tracking.end_run(params, run_id, name)
        artifacts.run_report(params, name, layout, final, run_id, tracking.run_link(params, run_id), model_id)
    except BaseException:
        tracking.mark_failed(params, run_id, name)
        raise
    finally:
        scope.close()
    ids = {"model_id": model_id, "image_model_id": models.get("image_model_id")}
    return {**final, "run_dir": run_dir, "mlflow_run_id": run_id, **ids}


def _to_compute(output: Path, epoch: int, resume: int, lost: set[Path] = frozenset()) -> bool:
    """Whether an output of ``epoch`` still has to be computed. Outputs of epochs before
    the resume point were computed from checkpoints that are gone: they must exist, or be
    reported lost by ``integrity.recover`` (a finished run)."""
    if output.exists() or output in lost:
        return False
    if epoch < resume:
        raise ConfigError(
            f"{output} is missing but the run already continued past epoch {epoch}: the run folder "
            f"was changed by hand; rerun with --fresh to start it over"
        )
    return True


def _evaluate(
    params: Params, layout: RunLayout, run_id: str, checkpoint: str, epoch: int, resume: int, lost: set[Path]
) -> None:
    """Evaluate the checkpoint after ``epoch`` epochs. Its test embedding's slices follow
    from ``epoch`` (:func:`dcml.evaluate.checkpoint_test_slices`, as ``dcml evaluate`` and
    the logged model have them)."""
    missing = epoch == params.train.epochs and not layout.embeddings("test", epoch).exists()  # read by summarize
    if _to_compute(layout.evaluation(epoch), epoch, resume, lost) or missing:
        slices = checkpoint_test_slices(params, epoch)
        embeddings = training.embed(str(layout.root), checkpoint, "test", epoch, slices)
        training.evaluate(str(layout.root), embeddings, epoch)
    if layout.evaluation(epoch) not in lost:
        state = str(layout.tracking_state)
        tracking.log_metrics_from(params, run_id, epoch, str(layout.evaluation(epoch)), "test", state)


def _log_resume(layout: RunLayout, resume: int | None, versions: list[dict[str, Any]], epochs: int) -> None:
    if resume is None:
        return
    logger = get_run_logger()
    if resume == epochs:
        logger.info(
            "%s: complete (epoch %d checkpoint); its outputs are reused, --fresh recomputes", layout.root.name, resume
        )
        return
    message = f"{layout.root.name}: continuing from the checkpoint of epoch {resume}"
    if len(versions) > 1 and versions[-1]["from_epoch"] == resume:
        before, now = versions[-2], versions[-1]
        logger.warning(
            "%s; the code changed since the run started (source %s -> %s, commit %s -> %s): epochs from %d on "
            "use the new code, earlier ones are kept (%s). Pass --fresh to recompute everything with the new code.",
            message,
            before["source_digest"],
            now["source_digest"],
            before["git_commit"],
            now["git_commit"],
            resume,
            layout.code_versions.name,
        )
    else:
        logger.info(message)
