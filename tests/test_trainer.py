"""Training loop, checkpoints and resume, on the tiny generated demo (CPU)."""

import dataclasses

import numpy as np
import pytest
import torch

from dcml.checkpoint import CheckpointError, load_checkpoint, restore_rng_states, rng_states
from dcml.data import build_bundle, load_splits
from dcml.data.samplers import ClassBalancedBatchSampler
from dcml.division import all_data, divide
from dcml.schedule import Segment, plan_from_params
from dcml.train import NonFiniteLossError, item_seed
from dcml.trainer import Trainer, epoch_seed

CPU = torch.device("cpu")


@pytest.fixture()
def bundle(tiny_params):
    return build_bundle(load_splits(tiny_params.data), tiny_params.data)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_k1_reproduces_the_plain_baseline(tiny_params, bundle):
    """K=1 through the schedule == a bare loop: all data, class-balanced batches, full embedding."""
    params = dataclasses.replace(tiny_params, cluster=dataclasses.replace(tiny_params.cluster, num_learners=1))
    labels = bundle.splits.train.labels
    trainer = Trainer.create(params, bundle.splits.train.num_classes, CPU)
    for segment in plan_from_params(params):
        assert segment.mode == "finetune"
        trainer.train_segment(segment, bundle.train, labels, all_data(len(labels)))

    plain = Trainer.create(params, bundle.splits.train.num_classes, CPU)
    t = params.train
    for epoch in range(t.epochs):
        seed = epoch_seed(params.seed, epoch)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        sampler = ClassBalancedBatchSampler(
            labels,
            np.arange(len(labels)),
            t.batch_size // t.images_per_class,
            t.images_per_class,
            seed=params.seed * 1009,
        )
        sampler.set_epoch(epoch)
        plain.model.train()
        # each image's augmentation is seeded by (epoch seed, step, position)
        seeded = [[(i, item_seed(seed, step, pos)) for pos, i in enumerate(b)] for step, b in enumerate(sampler)]
        loader = torch.utils.data.DataLoader(bundle.train, batch_sampler=seeded, generator=torch.Generator())
        for images, batch_labels, _ in loader:
            loss = plain.loss(plain.model(images), batch_labels, generator=generator)
            plain.optimizer.zero_grad()
            loss.backward()
            plain.optimizer.step()
    assert_same_weights(weights(trainer), weights(plain))


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, tiny_params, bundle):
    labels = bundle.splits.train.labels
    first, second = Segment(0, 1, "divide", True, 4), Segment(1, 2, "divide", False, 4)
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    embeddings, _, _ = trainer.embed(bundle.train_eval, num_learners=4)
    division = divide(embeddings, labels, 4, tiny_params.cluster, seed=0)

    trainer.train_segment(first, bundle.train, labels, division)
    path = trainer.save(tmp_path / "epoch-1.pt")
    trainer.train_segment(second, bundle.train, labels, division)

    resumed = Trainer.from_checkpoint(path, CPU)
    assert resumed.epochs_done == 1
    resumed.train_segment(second, bundle.train, labels, division)
    assert_same_weights(weights(trainer), weights(resumed))
    state = load_checkpoint(path)
    assert {"model", "optimizer", "loss", "epoch", "config", "rng"} <= state.keys()
    assert state["config"]["cluster"]["num_learners"] == 4


def test_checkpoint_write_is_atomic(tmp_path, tiny_params, bundle):
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    target = tmp_path / "ckpt.pt"

    class Boom(RuntimeError):
        pass

    original = torch.save

    def exploding_save(obj, f, *args, **kwargs):
        original(obj, f, *args, **kwargs)
        raise Boom

    torch.save = exploding_save
    try:
        with pytest.raises(Boom):
            trainer.save(target)
    finally:
        torch.save = original
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_segment_must_start_where_the_trainer_is(tiny_params, bundle):
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    with pytest.raises(RuntimeError, match="segment starts at 1"):
        trainer.train_segment(
            Segment(1, 2, "finetune", False, 1),
            bundle.train,
            bundle.splits.train.labels,
            all_data(len(bundle.splits.train)),
        )


def test_non_finite_loss_stops_with_a_clear_error(tiny_params, bundle):
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    with torch.no_grad():
        trainer.model.embedding.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 0"):
        trainer.train_segment(
            Segment(0, 1, "finetune", False, 1),
            bundle.train,
            bundle.splits.train.labels,
            all_data(len(bundle.splits.train)),
        )


def test_learnable_beta_is_optimised_by_the_trainer(tiny_params, bundle):
    loss = dataclasses.replace(tiny_params.loss, beta_mode="per_class")
    trainer = Trainer.create(dataclasses.replace(tiny_params, loss=loss), bundle.splits.train.num_classes, CPU)
    before = [p.detach().clone() for p in trainer.loss.parameters()]
    assert before, "a learnable beta must be a parameter of the loss"
    assert any(g["name"] == "loss" for g in trainer.optimizer.param_groups)
    trainer.train_segment(
        Segment(0, 1, "finetune", False, 1),
        bundle.train,
        bundle.splits.train.labels,
        all_data(len(bundle.splits.train)),
    )
    assert any(not torch.equal(b, a) for b, a in zip(before, trainer.loss.parameters(), strict=True))


def test_resume_loads_onto_the_cpu_first_and_keeps_adams_step_counters_there(tmp_path, tiny_params, bundle):
    labels = bundle.splits.train.labels
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    trainer.train_segment(Segment(0, 1, "finetune", False, 1), bundle.train, labels, all_data(len(labels)))
    path = trainer.save(tmp_path / "epoch-1.pt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resumed = Trainer.from_checkpoint(path, device)
    states = list(resumed.optimizer.state.values())
    assert states and all(state["step"].device.type == "cpu" for state in states)
    assert all(state["exp_avg"].device.type == device.type for state in states)


def test_model_only_load_embeds_like_the_full_trainer_and_cannot_train(tmp_path, tiny_params, bundle):
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    path = trainer.save(tmp_path / "epoch-0.pt")
    inference = Trainer.for_inference(path, CPU)
    assert inference.optimizer is None and inference.loss is None
    full, _, _ = trainer.embed(bundle.test, num_learners=4)
    only, _, _ = inference.embed(bundle.test, num_learners=4)
    np.testing.assert_array_equal(full, only)
    with pytest.raises(RuntimeError, match="inference"):
        inference.train_segment(
            Segment(0, 1, "finetune", False, 1), bundle.train, bundle.splits.train.labels, all_data(len(only))
        )


def test_cpu_checkpoints_hold_no_cuda_rng_state_and_old_multi_gpu_states_restore(tiny_params):
    states = rng_states(CPU)
    assert set(states) == {"torch"}
    assert not torch.cuda.is_initialized()
    # a checkpoint saved on a machine with 4 GPUs (the former format: every GPU's state)
    legacy = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4}
    restore_rng_states(legacy, CPU)
    if torch.cuda.is_available():  # fewer GPUs visible than saved: the current device's state is used
        restore_rng_states(legacy | {"cuda": legacy["cuda"][:1] * 4}, torch.device("cuda"))


def test_unreadable_checkpoints_are_named(tmp_path, tiny_params, bundle):
    trainer = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU)
    good = trainer.save(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    for path, message in [(truncated, "not a readable dcml checkpoint"), (other, "not a dcml checkpoint")]:
        with pytest.raises(CheckpointError, match=message) as error:
            Trainer.from_checkpoint(path, CPU)
        assert str(path) in str(error.value)


def test_results_do_not_depend_on_the_number_of_loader_workers(tiny_params, bundle):
    """Each image's augmentation has its own seed: 0 or 2 worker processes train alike."""
    labels = bundle.splits.train.labels
    trained = []
    for workers in (0, 2):
        params = dataclasses.replace(tiny_params, data=dataclasses.replace(tiny_params.data, num_workers=workers))
        trainer = Trainer.create(params, bundle.splits.train.num_classes, CPU)
        trainer.train_segment(Segment(0, 2, "finetune", False, 1), bundle.train, labels, all_data(len(labels)))
        trained.append(weights(trainer))
    assert_same_weights(*trained)


def test_auto_workers_follow_the_cpu_count():
    from dcml.device import available_cpus, resolve_num_workers

    cpus = available_cpus()
    assert resolve_num_workers(3, CPU) == 3
    assert resolve_num_workers("auto", CPU) == cpus // 4
    assert resolve_num_workers("auto", torch.device("cuda")) == max(1, min(16, cpus - 1))


def test_a_resumed_trainer_takes_the_runs_current_settings_that_do_not_change_results(tmp_path, tiny_params, bundle):
    path = Trainer.create(tiny_params, bundle.splits.train.num_classes, CPU).save(tmp_path / "epoch-0.pt")
    now = dataclasses.replace(tiny_params, data=dataclasses.replace(tiny_params.data, num_workers=2))
    assert Trainer.from_checkpoint(path, CPU).num_workers == 0  # the stored params
    assert Trainer.from_checkpoint(path, CPU, params=now).num_workers == 2
    assert Trainer.for_inference(path, CPU, params=now).num_workers == 2
