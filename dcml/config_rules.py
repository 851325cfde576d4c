"""Cross-field rules, checked before any compute (:func:`validate`, :func:`check_against_data`),
and the sweep's copies of a config (:func:`with_num_learners`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from dcml.config_schema import SEED_LIMIT, ConfigError, ModelConfig, Params


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


# The TPAMI'21 learner options: they act only with K > 1 and masks / hierarchical division
# on. Keys of options that are off are left out of run keys (tasks.layout), reset for K=1
# (with_num_learners) and may differ between compared runs (tasks.report).
MASK_KEYS = (
    "model.learners",
    "model.mask_init",
    "model.mask_decorrelation",
    "model.mask_split_state",
    "train.lr_masks",
    "train.mask_weight_decay",
)
HIERARCHY_KEYS = ("cluster.hierarchical",)
# Where the data is clustered acts only with K > 1 too (K=1 never clusters). Unlike the keys
# above it stays in every run key (tasks.layout), so existing run keys do not change.
DIVISION_KEYS = ("cluster.space",)
LEARNER_VARIANT_KEYS = MASK_KEYS + HIERARCHY_KEYS + DIVISION_KEYS

# Their values in every K=1 baseline (with_num_learners), whatever the params say: the
# options off. Fixed here, not taken from the defaults, so that a baseline's stored params
# (and its MLflow params) never change with them: train.lr_masks is the 1e-5 every baseline
# has stored since masks exist (the default then).
BASELINE_VALUES: dict[str, Any] = {
    "model.learners": "slices",
    "model.mask_init": "ones",
    "model.mask_decorrelation": 1.0,
    "model.mask_split_state": "inherit",
    "train.lr_masks": 1e-5,
    "train.mask_weight_decay": 0.0,
    "cluster.hierarchical": False,
    "cluster.space": "embedding",
}


def with_values(params: Params, values: dict[str, Any]) -> Params:
    """``params`` with the dotted ``section.name`` keys of ``values`` set (not validated)."""
    for key, value in values.items():
        section, name = key.split(".")
        updated = dataclasses.replace(getattr(params, section), **{name: value})
        params = dataclasses.replace(params, **{section: updated})
    return params


def with_defaults_for(params: Params, keys: tuple[str, ...]) -> Params:
    """``params`` with the dotted ``keys`` at their dataclass defaults."""
    defaults = Params()
    values = {}
    for key in keys:
        section, name = key.split(".")
        values[key] = getattr(getattr(defaults, section), name)
    return with_values(params, values)


def with_num_learners(params: Params, num_learners: int, seed: int | None = None) -> Params:
    """A copy for one sweep point (K, seed).

    K=1 is the plain baseline: the learner settings that only act with K > 1 (masks,
    hierarchical division, the clustered space) are reset to :data:`BASELINE_VALUES`, so the
    baseline of a TPAMI sweep is the same run (same run key, computed once) as that of a CVPR sweep.
    """
    new = dataclasses.replace(
        params,
        cluster=dataclasses.replace(params.cluster, num_learners=num_learners),
        seed=params.seed if seed is None else seed,
    )
    if num_learners == 1:
        new = with_values(new, BASELINE_VALUES)
    validate(new)
    return new
