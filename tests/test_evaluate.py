"""eval.nmi: true / final / false decides when NMI's k-means runs."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from dcml.config import EvalConfig
from dcml.evaluate import evaluate_embeddings
from dcml.metrics import nmi


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    embeddings = (rng.normal(size=(10, 16))[labels] + 0.3 * rng.normal(size=(50, 16))).astype(np.float32)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True), labels


@pytest.mark.parametrize(
    ("setting", "final", "expected"),
    [(True, False, True), (True, True, True), ("final", False, False), ("final", True, True), (False, True, False)],
)
def test_nmi_cadence(data, setting, final, expected):
    embeddings, labels = data
    splits = SimpleNamespace(query=None)  # a retrieval split: every item queries the others
    config = dataclasses.replace(EvalConfig(), nmi=setting, recall_ks=(1, 2))
    metrics = evaluate_embeddings(embeddings, labels, splits, config, seed=0, final=final)
    assert ("nmi" in metrics) == expected
    if expected:
        assert metrics["nmi"] == pytest.approx(nmi(embeddings, labels, seed=0))
