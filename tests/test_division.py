"""One division step: clustering space, learner matching across divisions, guards."""

import dataclasses

import numpy as np
import torch

from dcml.config import ClusterConfig
from dcml.data import build_bundle, load_splits
from dcml.division import all_data, divide
from dcml.fit import division_for_step
from dcml.schedule import Segment, Step
from dcml.trainer import Trainer


def blobs(num_per_class=6, num_classes=12, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), num_per_class)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_division_keeps_learners_on_their_data_across_reclustering():
    embeddings, labels = blobs()
    embeddings[:, 0] += 100.0 * (labels % 3)  # three well-separated groups of four classes
    config = ClusterConfig(niter=20)
    first = divide(embeddings, labels, 3, config, seed=1)
    # same data, another k-means seed: labels may come out permuted, matching undoes it
    second = divide(embeddings, labels, 3, config, seed=7, previous=first.assignment)
    np.testing.assert_array_equal(second.assignment, first.assignment)
    assert second.stats["nmi_to_previous"] == 1.0
    assert first.keep.all() and first.num_dropped == 0
    assert {"size_min", "size_max", "size_entropy", "images_dropped"} <= first.stats.keys()


def test_every_learner_gets_trainable_data():
    embeddings, labels = blobs(num_classes=8)
    division = divide(embeddings, labels, 4, ClusterConfig(), seed=0)
    for cluster in range(4):
        members = (division.assignment == cluster) & division.keep
        classes, counts = np.unique(labels[members], return_counts=True)
        assert (counts >= 2).sum() >= 2


def test_all_data_is_the_k1_division():
    division = all_data(5)
    assert division.num_clusters == 1 and division.assignment.tolist() == [0] * 5 and division.keep.all()


def test_cluster_space_embedding_or_backbone(tiny_params, monkeypatch):
    """The default clusters the learners' embedding; `backbone` clusters pooled features."""
    bundle = build_bundle(load_splits(tiny_params.data), tiny_params.data)
    seen = {}

    def spy(embeddings, labels, num_clusters, config, **kwargs):
        seen["dim"] = embeddings.shape[1]
        return all_data(len(labels))

    monkeypatch.setattr("dcml.division.next_division", spy)
    step = Step(Segment(0, 1, "divide", True, 4), "new", 0, evaluate=True)
    for space, expected_dim in [("embedding", tiny_params.model.embedding_dim), ("backbone", None)]:
        params = dataclasses.replace(tiny_params, cluster=dataclasses.replace(tiny_params.cluster, space=space))
        trainer = Trainer.create(params, bundle.splits.train.num_classes, torch.device("cpu"))
        division_for_step(trainer, bundle, step, None)
        if expected_dim is None:
            assert seen["dim"] == trainer.model.embedding.in_features != tiny_params.model.embedding_dim
        else:
            assert seen["dim"] == expected_dim
