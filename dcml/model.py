"""The embedding network: backbone + global average pool + dropout + Linear(d), split into learners.

Learner ``k`` of ``K`` owns the embedding dims :func:`learner_slice` ``(d, K, k)``; each
slice is L2-normalised on its own. The full embedding is the concatenation of the K
normalised slices, optionally re-normalised to unit norm (``ModelConfig.renormalize_full``).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from dcml.config import ModelConfig
from dcml.masks import LearnerMasks

_RESNETS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
}


class PretrainedWeightsError(RuntimeError):
    """Backbone weights could not be obtained or loaded; the message says how to fix it."""


def learner_slice(embedding_dim: int, num_learners: int, learner: int) -> slice:
    """Embedding dims owned by ``learner``: ``[k*d/K, (k+1)*d/K)``. The one slicing rule.

    Raises ``ValueError`` if ``num_learners`` does not divide ``embedding_dim`` or
    ``learner`` is not in ``[0, num_learners)``.
    """
    if num_learners < 1 or embedding_dim % num_learners:
        raise ValueError(f"num_learners ({num_learners}) must divide embedding_dim ({embedding_dim})")
    if not 0 <= learner < num_learners:
        raise ValueError(f"learner {learner} out of range [0, {num_learners})")
    size = embedding_dim // num_learners
    return slice(learner * size, (learner + 1) * size)


def small_cnn() -> tuple[nn.Module, int]:
    """A compact CNN for CPU demos: 4 conv blocks 32-64-128-256 (BN + ReLU).

    The first block downsamples with stride 2, the others with a 2x2 max-pool, so a
    64 px image ends as a (256, 4, 4) feature map. Returns ``(module, 256)``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = [3, 32, 64, 128, 256]
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        block = [
            nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        if i > 0:
            block.append(nn.MaxPool2d(2, ceil_mode=True))
        layers[f"block{i + 1}"] = nn.Sequential(*block)
    return nn.Sequential(layers), channels[-1]


def build_backbone(name: str, pretrained: str) -> tuple[nn.Module, int]:
    """Backbone producing a feature map (B, F, h, w), without pooling and classifier.

    ``name``: ``small_cnn`` or ``resnet18/34/50`` (torchvision; module names kept, so
    state-dict keys equal torchvision's minus ``fc.*``). ``pretrained``: ``"imagenet"``,
    ``"none"`` or a path to a local ``.pth`` state dict. Returns ``(module, F)``.
    """
    if name == "small_cnn":
        if pretrained == "imagenet":
            raise PretrainedWeightsError(
                "backbone small_cnn has no ImageNet weights; set model.pretrained to 'none' "
                "or to a local state-dict file"
            )
        backbone, num_features = small_cnn()
    elif name in _RESNETS:
        resnet = _RESNETS[name][0](weights=None)
        num_features = resnet.fc.in_features
        trunk = [(n, m) for n, m in resnet.named_children() if n not in ("avgpool", "fc")]
        backbone = nn.Sequential(OrderedDict(trunk))
    elif name == "efficientnet_lite0":
        from dcml.efficientnet import efficientnet_lite0  # optional packages: dcml[pretrained]

        return efficientnet_lite0(pretrained)  # loads its own weights (offline, from the package)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose small_cnn, {', '.join(_RESNETS)}, efficientnet_lite0")
    if pretrained != "none":
        load_pretrained_backbone(backbone, name, pretrained)
    return backbone, num_features


def load_pretrained_backbone(backbone: nn.Module, name: str, pretrained: str) -> None:
    """Load ``"imagenet"`` (torchvision download) or a local state-dict file into ``backbone``.

    ``fc.*`` keys are ignored; all other keys must match exactly. Raises
    :class:`PretrainedWeightsError` with instructions when weights are unavailable.
    """
    state = _imagenet_state_dict(name) if pretrained == "imagenet" else _local_state_dict(pretrained)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PretrainedWeightsError(f"weights {pretrained!r} do not fit backbone {name}: {error}") from error


def _imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    weights = _RESNETS[name][1]
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        raise PretrainedWeightsError(
            f"could not download ImageNet weights for {name} from {weights.url} ({error}). "
            f"Without internet, download that file elsewhere and either set model.pretrained "
            f"to its local path (a .pth state dict) or put it into {checkpoints}/ "
            f"($TORCH_HOME/hub/checkpoints/); or set model.pretrained to 'none'."
        ) from error


def _local_state_dict(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained: weights file not found: {file} "
            "(use 'imagenet', 'none' or the path to a .pth state dict)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{file} is not a state dict (a mapping of names to tensors)")
    return state


def init_embedding_blocks(linear: nn.Linear, num_learners: int) -> None:
    """Xavier-normal init of each learner's block of rows separately; bias zero."""
    with torch.no_grad():
        for k in range(num_learners):
            nn.init.xavier_normal_(linear.weight[learner_slice(linear.out_features, num_learners, k)])
        if linear.bias is not None:
            linear.bias.zero_()


def full_embedding(raw: torch.Tensor, num_learners: int, renormalize: bool) -> torch.Tensor:
    """(B, d) raw outputs -> concatenation of the K L2-normalised slices (B, d).

    With ``renormalize`` and K > 1 the result is scaled to unit norm (÷ sqrt(K)).
    """
    dim = raw.shape[1]
    parts = [F.normalize(raw[:, learner_slice(dim, num_learners, k)], dim=1) for k in range(num_learners)]
    embedding = torch.cat(parts, dim=1)
    return F.normalize(embedding, dim=1) if renormalize and num_learners > 1 else embedding


class Embedder(nn.Module):
    """backbone -> adaptive avg pool -> flatten -> Dropout -> Linear(F, d).

    With ``config.freeze_bn`` the backbone's BatchNorm layers stay in eval mode (running
    statistics fixed) while their affine weight and bias are still trained.

    With ``config.learners == "masks"`` (TPAMI'21) the model holds ``masks`` (K, d), one
    learnable mask per learner (:class:`dcml.masks.LearnerMasks`); learner ``k`` of ``c``
    active clusters embeds as ``normalize(emb * relu(mask))`` and the full embedding is
    ``normalize(emb)``. ``hierarchical``: the masks start as one and double with the
    clusters (see :meth:`LearnerMasks.grow`).
    """

    def __init__(self, config: ModelConfig, *, num_learners_init: int = 1, hierarchical: bool = False) -> None:
        super().__init__()
        self.config = config
        self.backbone, num_features = build_backbone(config.backbone, config.pretrained)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.embedding = nn.Linear(num_features, config.embedding_dim)
        # masks need not divide d into K blocks: then the layer is initialised as one block
        blocks = num_learners_init if config.embedding_dim % num_learners_init == 0 else 1
        init_embedding_blocks(self.embedding, blocks)
        self.masks: LearnerMasks | None = None
        if config.learners == "masks":
            self.masks = LearnerMasks(
                num_learners_init, config.embedding_dim, init=config.mask_init, hierarchical=hierarchical
            )
        self.train()

    def forward(
        self,
        images: torch.Tensor,
        *,
        num_learners: int = 1,
        learner: int | None = None,
        features: bool = False,
    ) -> torch.Tensor:
        """images (B, 3, H, W), any H, W -> (B, F) features, (B, d/K) slice, or (B, d) full."""
        pooled = self.pool(self.backbone(images)).flatten(1)
        if features:
            return pooled
        raw = self.embedding(self.dropout(pooled))
        dim = self.config.embedding_dim
        if self.masks is not None:
            return F.normalize(raw if learner is None else self.masks.apply(raw, num_learners, learner), dim=1)
        if learner is not None:
            return F.normalize(raw[:, learner_slice(dim, num_learners, learner)], dim=1)
        return full_embedding(raw, num_learners, self.config.renormalize_full)

    def train(self, mode: bool = True) -> Embedder:
        """Set training mode; with ``freeze_bn`` the backbone's BatchNorms stay in eval mode."""
        super().train(mode)
        if mode and self.config.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser group: ``backbone``, ``embedding`` (and ``masks``)."""
        groups = {"backbone": list(self.backbone.parameters()), "embedding": list(self.embedding.parameters())}
        if self.masks is not None:
            groups["masks"] = list(self.masks.parameters())
        return groups
