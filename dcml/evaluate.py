"""Zero-shot evaluation of an embedding on the test split, with the dataset's protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dcml import metrics
from dcml.config import EvalConfig
from dcml.data.records import Splits

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
    """How many separately normalised slices the test embedding has (see ``EvalConfig``)."""
    return {"schedule": segment_learners, "slices": num_learners, "full": 1}[config.embedding]


def evaluate_bundle(
    trainer: Trainer, bundle: DatasetBundle, *, segment_learners: int, final: bool = True
) -> dict[str, float]:
    """Embed the test split with ``trainer``'s model and evaluate it; reports ``num_slices``."""
    params = trainer.params
    slices = test_slices(params.eval, segment_learners, params.cluster.num_learners)
    embeddings, labels, _ = trainer.embed(bundle.test, num_learners=slices)
    metrics = evaluate_embeddings(embeddings, labels, bundle.splits, params.eval, seed=params.seed, final=final)
    return {**metrics, "num_slices": float(slices)}
