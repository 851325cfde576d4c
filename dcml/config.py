"""Frozen dataclasses mirroring ``params.yaml``; loading and up-front validation.

Every hyper-parameter lives in ``params.yaml``. :func:`load_params` turns it into a
:class:`Params` tree, failing with a :class:`ConfigError` that names the dotted key
for unknown, missing or mistyped entries. :func:`validate` checks cross-field rules
before any compute. Sweeps derive new configs with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A parameter is unknown, missing, mistyped or inconsistent; the message names it."""


# Seeds must be valid for every consumer: faiss (k-means, NMI) stores the seed in a C
# ``int`` (< 2**31) and seeds from the clock when it is negative; numpy's generators
# (``default_rng``) take non-negative integers only; torch takes [-2**63, 2**64).
SEED_LIMIT = 2**31


@dataclass(frozen=True)
class SplitConfig:
    """Class-disjoint train/test split for class-folder data.

    Either ``train_ratio`` (first fraction of the sorted class names is train) or
    explicit ``train_classes``/``test_classes`` lists (both non-empty).
    """

    train_ratio: float = 0.5
    train_classes: tuple[str, ...] = ()
    test_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoConfig:
    """The embedded synthetic dataset (see ``dcml/data/demo.py``)."""

    images_per_class: int = 30
    image_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["demo", "folder", "cub200", "cars196", "sop", "inshop", "vehicleid"] = "demo"
    root: str = "data/demo"
    split: SplitConfig = field(default_factory=SplitConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    vehicleid_test_size: Literal[800, 1600, 2400] = 800
    image_size: int = 224
    resize_size: int = 256
    crop_scale_min: float = 0.08  # RandomResizedCrop's smallest area fraction
    skip_corrupt: bool = False
    # DataLoader worker processes; "auto" = from the CPU count (see dcml.device.resolve_num_workers)
    num_workers: int | Literal["auto"] = 0


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["small_cnn", "resnet18", "resnet34", "resnet50", "efficientnet_lite0"] = "resnet50"
    pretrained: str = "imagenet"  # "imagenet" | "none" | path to a local weights file
    embedding_dim: int = 128
    dropout: float = 0.01
    freeze_bn: bool = True
    # Scale the concatenation of K normalised slices to unit norm (÷ sqrt K). A constant
    # scale: rankings, clustering and metrics are unchanged; for downstream consumers.
    renormalize_full: bool = True
    # How learners own the embedding: "slices" — disjoint blocks of d/K dims (CVPR'19);
    # "masks" — one learnable mask per learner over all d dims, normalize(emb * relu(m_k))
    # (TPAMI'21). The test embedding is the normalised full embedding with masks.
    learners: Literal["slices", "masks"] = "slices"
    mask_init: Literal["ones", "slices"] = "ones"  # ones (the authors' default) | each slice's indicator
    mask_decorrelation: float = 1.0  # lambda of the penalty lambda * mean pairwise cosine of relu(masks)


@dataclass(frozen=True)
class LossConfig:
    name: Literal["margin", "triplet"] = "margin"
    margin: float = 0.2  # alpha of the margin loss, also the triplet margin
    beta: float = 1.2
    beta_mode: Literal["fixed", "global", "per_class"] = "fixed"
    beta_lr: float = 5e-4
    nu: float = 0.0
    negative_sampler: Literal["distance_weighted", "nearest_beyond_cutoff"] = "distance_weighted"
    cutoff: float = 0.5
    nonzero_loss_cutoff: float = 1.4


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 80
    images_per_class: int = 4
    lr_backbone: float = 1e-5
    lr_embedding: float = 1e-5
    lr_masks: float = 1e-5  # model.learners: masks — their own Adam group
    mask_weight_decay: float = 0.0  # weight decay of the masks' group (the authors' default: none)
    weight_decay: float = 1e-4
    lr_decay_gamma: float = 1.0  # multiplicative LR decay per epoch; 1.0 = none
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False  # autocast to bfloat16 on CUDA
    channels_last: bool = False
    cudnn_benchmark: bool = False  # CUDA: let cuDNN pick the fastest convolution algorithms
    tf32: bool = False  # CUDA: TF32 matmuls/convolutions (float32 ops on tensor cores)
    # CUDA: deterministic kernels (cudnn.deterministic, torch.use_deterministic_algorithms,
    # CUBLAS_WORKSPACE_CONFIG) — same seed, same GPU and software → same metrics; slower
    deterministic: bool = False
    # newest checkpoints a run keeps (the final one is always kept); older ones are
    # deleted once nothing needs them. Does not change results (not part of the run key).
    keep_checkpoints: int = 1
    # data-parallel processes for training (torchrun: gloo on CPU, NCCL on CUDA, one GPU
    # each); 1 = one process. Part of the run key when > 1 (BatchNorm statistics and
    # float summation order differ), see dcml/distributed.py.
    nproc_per_node: int = 1


@dataclass(frozen=True)
class ClusterConfig:
    num_learners: int = 8  # K
    recluster_every: int = 2  # T, epochs between divisions
    divide_until_epoch: int = 190  # learners train on their slices before this epoch
    finetune_from_epoch: int = 190  # K=1 on all data from this epoch
    space: Literal["embedding", "backbone"] = "embedding"
    niter: int = 20
    nredo: int = 1
    max_points_per_centroid: int = 256
    # TPAMI'21: the number of clusters doubles at each division (2, 4, ... up to K) by
    # 2-means splits of the current clusters; children inherit their parent's learner
    hierarchical: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """``embedding`` is how test (and clustering) embeddings are normalised:
    ``schedule`` — K per-slice-normalised slices while dividing, the normalised full
    embedding once K=1; ``slices`` — always the K normalised slices; ``full`` — always
    the normalised full embedding."""

    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    every_epochs: int = 2  # evaluate the test split every N epochs, after epoch 0 and the last epoch
    embedding: Literal["schedule", "slices", "full"] = "schedule"
    nmi: Literal[True, False, "final"] = True  # "final": only at the last evaluation (k-means is costly)
    map_at_r: bool = True
    batch_size: int = 128


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = ""  # empty: one experiment per dataset, named after it
    log_model: bool = True


@dataclass(frozen=True)
class SweepConfig:
    num_learners: tuple[int, ...] = (1, 4)
    seeds: tuple[int, ...] = (0,)
    concurrent: bool = False


@dataclass(frozen=True)
class RetrievalConfig:
    """The pipeline's retrieval stages (``dvc.yaml``: embed, index, index-eval) after the sweep."""

    split: Literal["train", "test", "query", "gallery"] = "test"  # what the best model embeds and indexes
    factory: str = "Flat"  # faiss index_factory string: Flat (exact), HNSW32,Flat, IVF1024,Flat, ...


@dataclass(frozen=True)
class Params:
    seed: int = 0
    preset: str = "none"  # name of a file in dcml/presets/ overlaid on these values
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)


def load_params(path: str | Path, *, resolve_preset: bool = True) -> Params:
    """Read a YAML file into :class:`Params` and validate it.

    With ``resolve_preset`` the named preset and the ``overrides`` section are applied
    (params.yaml < preset < overrides); files written by runs are already resolved.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {problem or error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if resolve_preset:
        return params_from_dict(apply_preset(raw))
    return params_from_stored(raw)


PRESETS_DIR = Path(__file__).parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def apply_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``dcml/presets/<preset>.yaml`` on ``raw``, then ``raw['overrides']``.

    Presets hold the paper's setup per benchmark; they never set ``data.root``,
    ``tracking`` or ``sweep``, which stay the user's. ``overrides`` (same nested keys as
    params.yaml, e.g. ``overrides: {cluster: {divide_until_epoch: 80}}`` or
    ``dvc exp run -S overrides.train.epochs=50``) beats the preset.
    """
    raw = dict(raw)
    overrides = raw.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError("overrides: expected a mapping of params keys")
    name = raw.get("preset", "none")
    path = PRESETS_DIR / f"{name}.yaml"
    if name != "none" and (not isinstance(name, str) or not path.is_file()):
        raise ConfigError(f"preset: unknown preset {name!r}; available: {available_presets()}")
    if name != "none":
        raw = _deep_merge(raw, yaml.safe_load(path.read_text()) or {})
    return _deep_merge(raw, overrides)


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Build and validate :class:`Params` from a nested dict (every key required)."""
    params = _build(Params, raw, prefix="")
    validate(params)
    return params


def params_from_stored(raw: dict[str, Any]) -> Params:
    """Params a run or checkpoint stored (already resolved). Keys added to dcml after they
    were written take their defaults — the behaviour the run had (e.g. ``model.learners:
    slices``) — so older runs stay readable; unknown keys still fail."""
    return params_from_dict(_with_defaults(raw, to_dict(Params())))


def _with_defaults(raw: Any, defaults: dict[str, Any]) -> Any:
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, dict):
            out[key] = _with_defaults(out[key], default)
    return out


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key: {_join(prefix, unknown[0])}")
    missing = sorted(fields - set(raw))
    if missing:
        raise ConfigError(f"missing key: {_join(prefix, missing[0])}")
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in fields}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is Literal:
        if not any(type(value) is type(option) and value == option for option in typing.get_args(hint)):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(hint))}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type, _) = typing.get_args(hint)
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {' or '.join(_describe(o) for o in typing.get_args(hint))}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    return "an integer" if hint is int else getattr(hint, "__name__", str(hint))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate(params: Params, num_train_classes: int | None = None) -> None:
    """Cross-field rules, checked before any compute. Raises :class:`ConfigError`."""
    t, c, m, lo, d = params.train, params.cluster, params.model, params.loss, params.data
    rules: list[tuple[bool, str]] = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.images_per_class >= 2, "train.images_per_class must be >= 2 (positives needed)"),
        (
            t.batch_size % t.images_per_class == 0,
            f"train.batch_size ({t.batch_size}) must be divisible by train.images_per_class ({t.images_per_class})",
        ),
        (t.batch_size // t.images_per_class >= 2, "train.batch_size must hold >= 2 classes"),
        (t.lr_backbone >= 0 and t.lr_embedding > 0, "train learning rates must be positive"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (lo.beta_lr >= 0, "loss.beta_lr must be >= 0"),
        (
            lo.nu == 0 or lo.beta_mode != "fixed",
            "loss.nu regularises a learnable beta: set loss.beta_mode to global or per_class, or nu to 0",
        ),
        (
            lo.name == "margin" or (lo.beta_mode == "fixed" and lo.negative_sampler == "distance_weighted"),
            "loss.beta_mode and loss.negative_sampler apply to the margin loss only; the triplet loss "
            "mines semi-hard negatives (leave them at fixed / distance_weighted)",
        ),
        (
            not m.freeze_bn or m.pretrained != "none",
            "model.freeze_bn keeps BatchNorm statistics of pretrained weights; with model.pretrained: none "
            "they would stay at their initial values (set freeze_bn: false)",
        ),
        (0 < t.lr_decay_gamma <= 1, "train.lr_decay_gamma must be in (0, 1]"),
        (c.num_learners >= 1, f"cluster.num_learners (-k) must be >= 1, got {c.num_learners}"),
        (_valid_seed(params.seed), f"seed must be in [0, 2**31) (faiss and numpy seeds), got {params.seed}"),
        (
            c.num_learners < 1 or not needs_divisible_dim(m) or m.embedding_dim % c.num_learners == 0,
            f"model.embedding_dim ({m.embedding_dim}) must be divisible by cluster.num_learners ({c.num_learners})",
        ),
        (
            not c.hierarchical or _is_power_of_two(c.num_learners),
            f"cluster.hierarchical doubles the clusters at each division: cluster.num_learners "
            f"({c.num_learners}) must be a power of two",
        ),
        (m.mask_decorrelation >= 0, "model.mask_decorrelation must be >= 0"),
        (
            not (m.learners == "masks" and m.mask_init == "slices" and c.hierarchical),
            "model.mask_init: slices is not defined with cluster.hierarchical (masks would start as K "
            "slices while fewer clusters exist); use mask_init: ones",
        ),
        (
            not (m.learners == "masks" and params.eval.embedding == "slices"),
            "eval.embedding: slices needs model.learners: slices (masks have no slices; their test "
            "embedding is the normalised full embedding)",
        ),
        (t.lr_masks >= 0 and t.mask_weight_decay >= 0, "train.lr_masks and train.mask_weight_decay must be >= 0"),
        (c.recluster_every >= 1, "cluster.recluster_every must be >= 1"),
        (
            0 <= c.divide_until_epoch <= c.finetune_from_epoch <= t.epochs,
            "epoch boundaries must satisfy 0 <= cluster.divide_until_epoch <= "
            f"cluster.finetune_from_epoch <= train.epochs (got {c.divide_until_epoch}, "
            f"{c.finetune_from_epoch}, {t.epochs})",
        ),
        (c.niter >= 1 and c.nredo >= 1, "cluster.niter and cluster.nredo must be >= 1"),
        (c.max_points_per_centroid >= 1, "cluster.max_points_per_centroid must be >= 1"),
        (0 <= m.dropout < 1, "model.dropout must be in [0, 1)"),
        (m.embedding_dim >= 1, "model.embedding_dim must be >= 1"),
        (lo.margin >= 0 and lo.beta > 0, "loss.margin must be >= 0 and loss.beta > 0"),
        (0 < lo.cutoff < lo.nonzero_loss_cutoff <= 2, "need 0 < loss.cutoff < loss.nonzero_loss_cutoff <= 2"),
        (lo.nu >= 0, "loss.nu must be >= 0"),
        (0 < d.split.train_ratio < 1, "data.split.train_ratio must be in (0, 1)"),
        (
            bool(d.split.train_classes) == bool(d.split.test_classes),
            "data.split.train_classes and data.split.test_classes must be given together",
        ),
        (not set(d.split.train_classes) & set(d.split.test_classes), "data.split lists overlap"),
        (8 <= d.image_size <= d.resize_size, "need 8 <= data.image_size <= data.resize_size"),
        (0 < d.crop_scale_min <= 1, "data.crop_scale_min must be in (0, 1]"),
        (d.num_workers == "auto" or d.num_workers >= 0, "data.num_workers must be >= 0 or auto"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1 (resume needs the latest checkpoint)"),
        (t.nproc_per_node >= 1, "train.nproc_per_node must be >= 1"),
        (
            t.nproc_per_node <= 2 * t.images_per_class,
            "train.nproc_per_node must be <= 2 x train.images_per_class: the smallest batch (2 classes) "
            "must give every process at least one image",
        ),
        (
            not (t.deterministic and t.cudnn_benchmark),
            "train.deterministic and train.cudnn_benchmark exclude each other (benchmarking picks "
            "algorithms by timing, which is not deterministic)",
        ),
        (d.demo.images_per_class >= 2 and d.demo.image_size >= 16, "data.demo too small"),
        (bool(params.eval.recall_ks) and min(params.eval.recall_ks) >= 1, "eval.recall_ks must be >= 1"),
        (params.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (params.eval.every_epochs >= 1, "eval.every_epochs must be >= 1"),
        (bool(params.sweep.num_learners) and bool(params.sweep.seeds), "sweep lists must be non-empty"),
        (bool(params.retrieval.factory.strip()), "retrieval.factory must be a faiss index_factory string, e.g. Flat"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    for seed in params.sweep.seeds:
        if not _valid_seed(seed):
            raise ConfigError(f"sweep.seeds: {seed} is not in [0, 2**31) (faiss and numpy seeds)")
    for k in params.sweep.num_learners:
        if k < 1:
            raise ConfigError(f"sweep.num_learners: {k} must be >= 1")
        if needs_divisible_dim(m) and m.embedding_dim % k:
            raise ConfigError(f"sweep.num_learners: {k} does not divide model.embedding_dim ({m.embedding_dim})")
        if c.hierarchical and not _is_power_of_two(k):
            raise ConfigError(f"sweep.num_learners: {k} is not a power of two (cluster.hierarchical: true)")
    for k in {c.num_learners, *params.sweep.num_learners}:
        # the division with K clusters comes after log2(K) re-clusterings; learners must train on it
        reached = (k.bit_length() - 1) * c.recluster_every
        if c.hierarchical and k > 1 and reached >= c.divide_until_epoch:
            raise ConfigError(
                f"cluster.hierarchical: K={k} clusters exist from epoch {reached} (log2 K re-clusterings every "
                f"cluster.recluster_every={c.recluster_every} epochs) but learners stop at "
                f"cluster.divide_until_epoch={c.divide_until_epoch}; raise it or lower K / recluster_every"
            )
    if num_train_classes is not None:
        check_against_data(params, num_train_classes)


def needs_divisible_dim(model: ModelConfig) -> bool:
    """Slices (and masks initialised as slices) split d into K equal blocks."""
    return model.learners == "slices" or model.mask_init == "slices"


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _valid_seed(seed: int) -> bool:
    return 0 <= seed < SEED_LIMIT


def check_against_data(params: Params, num_train_classes: int, num_retrieval_items: int | None = None) -> None:
    """Rules that need the dataset, checked before any compute.

    Every learner needs at least two classes to form negatives, so K may be at most half
    the training classes. ``num_retrieval_items`` is what a query searches (test images
    minus the query itself, or the gallery size); the largest recall k must fit in it.
    """
    if num_train_classes < 2:
        raise ConfigError(f"the training split has {num_train_classes} class(es); need >= 2")
    ks = {params.cluster.num_learners, *params.sweep.num_learners}
    if 2 * max(ks) > num_train_classes:
        raise ConfigError(
            f"cluster.num_learners/sweep.num_learners ({max(ks)}) exceeds the number of "
            f"training classes ({num_train_classes}) / 2: each learner needs at least 2 classes"
        )
    largest_k = max(params.eval.recall_ks)
    if num_retrieval_items is not None and largest_k > num_retrieval_items:
        raise ConfigError(
            f"eval.recall_ks: {largest_k} exceeds the {num_retrieval_items} items a test query can retrieve"
        )


def to_dict(params: Params) -> dict[str, Any]:
    """Nested plain dict (tuples as lists), the inverse of :func:`params_from_dict` —
    except that credentials in ``tracking.mlflow_uri`` are redacted (:func:`redact_uri`):
    everything dcml writes or logs goes through here, and none of it may hold a password.
    The connection uses ``params.tracking.mlflow_uri`` itself."""

    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return value

    def walk(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return convert(obj)

    out = walk(params)
    out["tracking"]["mlflow_uri"] = redact_uri(out["tracking"]["mlflow_uri"])
    return out


def redact_uri(uri: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://***@host/...``; other URIs unchanged."""
    user, host = _authority(uri)
    return uri if user is None else uri.replace(f"{user}@{host}", f"***@{host}", 1)


def split_uri_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without user info, user, password)``, both percent-decoded; ``None`` when absent."""
    from urllib.parse import unquote

    user, host = _authority(uri)
    if user is None:
        return uri, None, None
    name, colon, password = user.partition(":")
    return uri.replace(f"{user}@{host}", host, 1), unquote(name), unquote(password) if colon else None


def _authority(uri: str) -> tuple[str | None, str]:
    """``(user info or None, host)`` of a ``scheme://[user@]host/...`` URI."""
    _, sep, rest = uri.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if not sep or "@" not in authority:
        return None, authority
    user, _, host = authority.rpartition("@")
    return user, host


def flatten(params: Params) -> dict[str, Any]:
    """Dotted keys to values, e.g. ``{"cluster.num_learners": 4, ...}``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(_join(prefix, key), value)
        else:
            out[prefix] = node

    walk("", to_dict(params))
    return out


# The TPAMI'21 learner options: they act only with K > 1 and masks / hierarchical division
# on. Keys of options that are off are left out of run keys (tasks.layout), reset for K=1
# (with_num_learners) and may differ between compared runs (tasks.report).
MASK_KEYS = (
    "model.learners",
    "model.mask_init",
    "model.mask_decorrelation",
    "train.lr_masks",
    "train.mask_weight_decay",
)
HIERARCHY_KEYS = ("cluster.hierarchical",)
LEARNER_VARIANT_KEYS = MASK_KEYS + HIERARCHY_KEYS


def with_defaults_for(params: Params, keys: tuple[str, ...]) -> Params:
    """``params`` with the dotted ``keys`` at their dataclass defaults."""
    defaults = Params()
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(defaults, section), name)
        updated = dataclasses.replace(getattr(params, section), **{name: value})
        params = dataclasses.replace(params, **{section: updated})
    return params


def with_num_learners(params: Params, num_learners: int, seed: int | None = None) -> Params:
    """A copy for one sweep point (K, seed).

    K=1 is the plain baseline: the learner settings that only act with K > 1 (masks,
    hierarchical division) are reset to their defaults, so the baseline of a TPAMI sweep
    is the same run (same run key, computed once) as that of a CVPR sweep.
    """
    new = dataclasses.replace(
        params,
        cluster=dataclasses.replace(params.cluster, num_learners=num_learners),
        seed=params.seed if seed is None else seed,
    )
    if num_learners == 1:
        new = with_defaults_for(new, LEARNER_VARIANT_KEYS)
    validate(new)
    return new
