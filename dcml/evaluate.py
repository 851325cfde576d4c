"""Zero-shot evaluation of an embedding on the test split, with the dataset's protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dcml import metrics
from dcml.config import ConfigError, EvalConfig, Params
from dcml.data.records import Splits
from dcml.schedule import steps_from_params

if TYPE_CHECKING:
    from dcml.data import DatasetBundle
    from dcml.trainer import Trainer


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    splits: Splits,
    config: EvalConfig,
    *,
    seed: int = 0,
    final: bool = True,
) -> dict[str, float]:
    """Metrics of test ``embeddings`` (n, D) float32 with ``labels`` (n,) in test order.

    For query/gallery datasets (In-shop) the first ``len(splits.query)`` rows are the
    queries and they search the gallery only; otherwise every item queries all others.
    ``final`` says whether this is the run's last evaluation (``eval.nmi: final``
    computes NMI only then).
    """
    if splits.query is not None:
        num_query = len(splits.query)
        return metrics.evaluate_query_gallery(
            embeddings[:num_query],
            labels[:num_query],
            embeddings[num_query:],
            labels[num_query:],
            config.recall_ks,
            with_map=config.map_at_r,
        )
    return metrics.evaluate_retrieval(
        embeddings,
        labels,
        config.recall_ks,
        nmi_seed=seed,
        with_nmi=nmi_enabled(config, final),
        with_map=config.map_at_r,
    )


def nmi_enabled(config: EvalConfig, final: bool) -> bool:
    """``eval.nmi``: true — every evaluation; ``final`` — the last one only; false — never."""
    return config.nmi is True or (config.nmi == "final" and final)


def test_slices(config: EvalConfig, segment_learners: int, num_learners: int) -> int:
    """How many separately normalised slices the test embedding has under ``eval.embedding``
    (see ``EvalConfig``), given the learners of the segment just trained. Callers ask
    :func:`checkpoint_test_slices`."""
    return {"schedule": segment_learners, "slices": num_learners, "full": 1}[config.embedding]


test_slices.__test__ = False  # a helper, not a test, where pytest meets it by name


def checkpoint_test_slices(params: Params, epoch: int) -> int:
    """How many separately normalised slices the test embedding of a checkpoint has that
    trained ``epoch`` epochs (``Trainer.epochs_done``) of the run ``params`` — the one
    place that decides, for the pipeline (``dcml.fit``, the flow), ``dcml evaluate`` and
    the logged model.

    The learners are those of the schedule segment that ends at ``epoch`` (epoch 0, the
    untrained model: the first segment's), then ``eval.embedding`` applies. With
    ``model.learners: masks`` the model has no slices: always 1 (the normalised full
    embedding).
    """
    if params.model.learners == "masks":
        return 1
    segments = [step.segment for step in steps_from_params(params)]
    if epoch == 0 and segments:
        learners = segments[0].num_learners
    else:
        # the segment that trained the checkpoint's last epoch (it ends at ``epoch``:
        # checkpoints are written at segment ends)
        trained = [s for s in segments if s.start_epoch < epoch <= s.end_epoch]
        if not trained:
            raise ConfigError(f"a checkpoint after {epoch} epochs is outside the run's {params.train.epochs} epochs")
        learners = trained[0].num_learners
    return test_slices(params.eval, learners, params.cluster.num_learners)


def evaluate_bundle(trainer: Trainer, bundle: DatasetBundle, *, final: bool = True) -> dict[str, float]:
    """Embed the test split with ``trainer``'s model as the checkpoint after
    ``trainer.epochs_done`` epochs is evaluated (:func:`checkpoint_test_slices`) and
    evaluate it; reports ``num_slices``."""
    params = trainer.params
    slices = checkpoint_test_slices(params, trainer.epochs_done)
    embeddings, labels, _ = trainer.embed(bundle.test, num_learners=slices)
    metrics = evaluate_embeddings(embeddings, labels, bundle.splits, params.eval, seed=params.seed, final=final)
    return {**metrics, "num_slices": float(slices)}
