import pytest

from dcml.schedule import Segment, mode_of_epoch, plan


def modes(segments):
    return [(s.start_epoch, s.end_epoch, s.mode, s.recluster) for s in segments]


def test_divide_then_finetune_with_recluster_every_two():
    segments = plan(epochs=8, num_learners=4, recluster_every=2, divide_until_epoch=6, finetune_from_epoch=6)
    assert modes(segments) == [
        (0, 2, "divide", True),
        (2, 4, "divide", True),
        (4, 6, "divide", True),
        (6, 8, "finetune", False),
    ]
    assert [s.num_learners for s in segments] == [4, 4, 4, 1]
    assert segments[0].name == "epochs-0-1"


def test_authors_8_19_behaviour_is_expressible():
    """Full-embedding loss from epoch 80 (batches still clustered), K=1 on all data from 190."""
    segments = plan(epochs=200, num_learners=8, recluster_every=2, divide_until_epoch=80, finetune_from_epoch=190)
    for epoch in range(200):
        segment = next(s for s in segments if s.start_epoch <= epoch < s.end_epoch)
        expected = "divide" if epoch < 80 else "clustered_full" if epoch < 190 else "finetune"
        assert segment.mode == expected == mode_of_epoch(epoch, 8, 80, 190)
    clustered = [s for s in segments if s.mode == "clustered_full"]
    assert all(s.num_clusters == 8 and s.num_learners == 1 for s in clustered)
    assert all(s.recluster for s in segments if s.mode != "finetune")  # every 2 epochs until 190


def test_boundaries_that_are_not_multiples_of_t_split_segments():
    segments = plan(epochs=7, num_learners=2, recluster_every=3, divide_until_epoch=4, finetune_from_epoch=5)
    assert modes(segments) == [
        (0, 3, "divide", True),
        (3, 4, "divide", True),
        (4, 5, "clustered_full", False),  # mode changes mid-period: clusters kept
        (5, 6, "finetune", False),
        (6, 7, "finetune", False),
    ]


def test_k1_is_the_plain_baseline():
    segments = plan(epochs=5, num_learners=1, recluster_every=2, divide_until_epoch=4, finetune_from_epoch=4)
    assert all(s.mode == "finetune" and not s.recluster and s.num_clusters == 1 for s in segments)
    assert [s.end_epoch for s in segments] == [2, 4, 5]


def test_segments_cover_every_epoch_once():
    for args in [(10, 4, 3, 7, 9), (1, 2, 1, 0, 0), (6, 8, 2, 6, 6)]:
        segments = plan(*args)
        covered = [e for s in segments for e in range(s.start_epoch, s.end_epoch)]
        assert covered == list(range(args[0]))
        assert all(isinstance(s, Segment) and s.end_epoch > s.start_epoch for s in segments)


def test_invalid_boundaries_raise():
    with pytest.raises(ValueError):
        plan(epochs=5, num_learners=2, recluster_every=2, divide_until_epoch=4, finetune_from_epoch=3)


def test_evaluation_cadence_cuts_segments_without_extra_reclustering():
    segments = plan(
        epochs=6, num_learners=4, recluster_every=2, divide_until_epoch=4, finetune_from_epoch=4, evaluate_every=1
    )
    assert modes(segments) == [
        (0, 1, "divide", True),
        (1, 2, "divide", False),  # same division, evaluated after epoch 1
        (2, 3, "divide", True),
        (3, 4, "divide", False),
        (4, 5, "finetune", False),
        (5, 6, "finetune", False),
    ]


def test_plan_from_params_uses_the_evaluation_cadence():
    import dataclasses

    from dcml.config import load_params
    from dcml.schedule import plan_from_params
    from tests.conftest import REPO_ROOT

    params = load_params(REPO_ROOT / "params.yaml")
    for every in (1, 3):
        params = dataclasses.replace(params, eval=dataclasses.replace(params.eval, every_epochs=every))
        ends = [s.end_epoch for s in plan_from_params(params)]
        expected = sorted(
            {*range(every, params.train.epochs + 1, every), *range(2, params.train.epochs + 1, 2), params.train.epochs}
        )
        assert ends == expected


def test_steps_evaluate_at_the_cadence_and_say_where_batches_come_from():
    from dcml.schedule import steps

    segments = plan(
        epochs=20, num_learners=8, recluster_every=2, divide_until_epoch=8, finetune_from_epoch=14, evaluate_every=10
    )
    result = steps(segments, epochs=20, evaluate_every=10)
    assert [s.segment.end_epoch for s in result if s.evaluate] == [10, 20]
    assert [s.division for s in result] == ["new"] * 7 + ["all"] * 3
    assert [s.division_index for s in result] == [0, 1, 2, 3, 4, 5, 6, -1, -1, -1]


def test_steps_keep_the_division_between_reclusterings():
    from dcml.schedule import steps

    # T=4 with evaluation every 2 epochs: the second half of each period reuses its division
    segments = plan(
        epochs=8, num_learners=2, recluster_every=4, divide_until_epoch=8, finetune_from_epoch=8, evaluate_every=2
    )
    result = steps(segments, epochs=8, evaluate_every=2)
    assert [(s.segment.start_epoch, s.division, s.division_index) for s in result] == [
        (0, "new", 0),
        (2, "previous", 0),
        (4, "new", 1),
        (6, "previous", 1),
    ]
    assert all(s.evaluate for s in result)


def test_the_last_epoch_is_always_evaluated():
    from dcml.schedule import evaluates_at

    assert [e for e in range(0, 23) if evaluates_at(e, 23, 10)] == [0, 10, 20]
    assert evaluates_at(23, 23, 10)
