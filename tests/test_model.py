"""Tests for dcml.model: slicing, normalisation, backbones, pretrained weights, frozen BN."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from dcml.config import ModelConfig
from dcml.model import Embedder, PretrainedWeightsError, build_backbone, learner_slice

SMALL = ModelConfig(backbone="small_cnn", pretrained="none", embedding_dim=32, dropout=0.0)


def small_embedder(**changes: object) -> Embedder:
    torch.manual_seed(0)
    return Embedder(dataclasses.replace(SMALL, **changes))


def images(batch: int = 4, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_learners", [1, 2, 4, 8, 128])
def test_learner_slices_cover_dims_disjointly(num_learners: int) -> None:
    dims = [i for k in range(num_learners) for i in range(128)[learner_slice(128, num_learners, k)]]
    assert dims == list(range(128))


@pytest.mark.parametrize(("dim", "num_learners", "learner"), [(128, 3, 0), (10, 4, 1), (8, 2, 2), (8, 2, -1)])
def test_learner_slice_rejects_bad_arguments(dim: int, num_learners: int, learner: int) -> None:
    with pytest.raises(ValueError):
        learner_slice(dim, num_learners, learner)


@pytest.mark.parametrize("num_learners", [2, 4])
def test_each_learner_slice_is_unit_norm(num_learners: int) -> None:
    model = small_embedder().eval()
    x = images()
    with torch.no_grad():
        full = model(x, num_learners=num_learners)
        for k in range(num_learners):
            part = model(x, num_learners=num_learners, learner=k)
            assert part.shape == (4, 32 // num_learners)
            torch.testing.assert_close(part.norm(dim=1), torch.ones(4))
            expected = full[:, learner_slice(32, num_learners, k)] * math.sqrt(num_learners)
            torch.testing.assert_close(part, expected)


@pytest.mark.parametrize(("renormalize", "num_learners"), [(True, 4), (False, 4), (True, 1), (False, 1)])
def test_full_embedding_norm(renormalize: bool, num_learners: int) -> None:
    model = small_embedder(renormalize_full=renormalize).eval()
    with torch.no_grad():
        full = model(images(), num_learners=num_learners)
    expected = 1.0 if renormalize else math.sqrt(num_learners)
    assert full.shape == (4, 32)
    torch.testing.assert_close(full.norm(dim=1), torch.full((4,), expected))


def test_single_learner_is_normalised_linear_output() -> None:
    model = small_embedder(dropout=0.5).eval()
    x = images()
    with torch.no_grad():
        expected = F.normalize(model.embedding(model(x, features=True)), dim=1)
        torch.testing.assert_close(model(x), expected)


def test_forward_rejects_indivisible_num_learners() -> None:
    with pytest.raises(ValueError):
        small_embedder()(images(), num_learners=3)


@pytest.mark.parametrize(("backbone", "num_features"), [("small_cnn", 256), ("resnet18", 512)])
@pytest.mark.parametrize("size", [32, 64, 97])
def test_any_input_size(backbone: str, num_features: int, size: int) -> None:
    model = small_embedder(backbone=backbone).eval()
    with torch.no_grad():
        assert model(images(2, size), features=True).shape == (2, num_features)
        assert model(images(2, size), num_learners=2).shape == (2, 32)


def test_embedding_rows_initialised_per_learner_block() -> None:
    torch.manual_seed(0)
    model = Embedder(dataclasses.replace(SMALL, embedding_dim=64), num_learners_init=4)
    weight = model.embedding.weight.detach()
    expected_std = math.sqrt(2.0 / (256 + 16))  # xavier normal of one (16, 256) block
    for k in range(4):
        assert weight[learner_slice(64, 4, k)].std().item() == pytest.approx(expected_std, rel=0.1)
    assert torch.count_nonzero(model.embedding.bias) == 0


def test_parameter_groups_partition_parameters() -> None:
    model = small_embedder()
    groups = model.parameter_groups()
    assert set(groups) == {"backbone", "embedding"}
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def batch_norms(model: Embedder) -> list[nn.BatchNorm2d]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]


def train_step(model: Embedder) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(images(8) * 3 + 1, num_learners=2, learner=1).sum() + model(images(8), features=True).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_frozen_batchnorm_keeps_running_stats_and_trains_affine() -> None:
    model = small_embedder(freeze_bn=True, dropout=0.1)
    model.eval().train()
    bn = batch_norms(model)[0]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    train_step(model)
    assert model.training and model.dropout.training and not bn.training
    assert bn.weight.requires_grad and bn.bias.requires_grad
    torch.testing.assert_close(bn.running_mean, before["running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, before["running_var"], rtol=0, atol=0)
    assert bn.num_batches_tracked == before["num_batches_tracked"]
    assert not torch.equal(bn.weight, before["weight"])


def test_unfrozen_batchnorm_updates_running_stats() -> None:
    model = small_embedder(freeze_bn=False)
    bn = batch_norms(model)[0]
    before = bn.running_mean.clone()
    train_step(model)
    assert bn.training and bn.num_batches_tracked == 2
    assert not torch.equal(bn.running_mean, before)


def test_channels_last_gives_same_embeddings() -> None:
    model = small_embedder(backbone="resnet18").eval()
    x = images(2)
    with torch.no_grad():
        reference = model(x, num_learners=2)
        model = model.to(memory_format=torch.channels_last)
        output = model(x.to(memory_format=torch.channels_last), num_learners=2)
    torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-5)


def test_imagenet_offline_raises_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # a dead proxy makes the download fail fast even where there is internet
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(PretrainedWeightsError, match="could not download") as info:
        build_backbone("resnet18", "imagenet")
    message = str(info.value)
    assert "model.pretrained" in message and "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_small_cnn_has_no_imagenet_weights() -> None:
    with pytest.raises(PretrainedWeightsError, match="small_cnn"):
        build_backbone("small_cnn", "imagenet")


def test_unknown_backbone_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", "none")


def test_local_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(3)
    reference = models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    model = Embedder(dataclasses.replace(SMALL, backbone="resnet18", pretrained=str(path)))
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in reference if not k.startswith("fc.")}
    for key, value in loaded.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(PretrainedWeightsError, match="not found") as info:
        build_backbone("resnet18", str(path))
    assert str(path) in str(info.value)


def test_mismatched_weights_file_rejected(tmp_path) -> None:
    path = tmp_path / "small.pth"
    torch.save(build_backbone("small_cnn", "none")[0].state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        build_backbone("resnet18", str(path))
