"""The whole method in-process on the tiny generated demo: it learns, and it is deterministic."""

import torch

from dcml.data import build_bundle, load_splits
from dcml.fit import fit

CPU = torch.device("cpu")


def test_divide_and_conquer_k4_beats_the_untrained_network_and_is_deterministic(tiny_params):
    assert tiny_params.cluster.num_learners == 4 and tiny_params.train.epochs == 3
    bundle = build_bundle(load_splits(tiny_params.data), tiny_params.data)
    first = fit(tiny_params, bundle, CPU)
    untrained, trained = first.evaluations[0][1], first.evaluations[-1][1]
    assert trained["recall@1"] > untrained["recall@1"] + 0.02, (untrained, trained)
    # two divisions (epochs 0 and 1, K=4), then fine-tuning with K=1 on all data
    assert [epoch for epoch, _ in first.divisions] == [0, 1]
    assert all(d.num_clusters == 4 and len(set(d.assignment.tolist())) == 4 for _, d in first.divisions)
    assert [s.epoch for s in first.epochs] == [0, 1, 2]

    second = fit(tiny_params, bundle, CPU)
    assert second.evaluations == first.evaluations
    assert [s.loss for s in second.epochs] == [s.loss for s in first.epochs]
