"""The parameter schema: every key of ``params.yaml`` with its default and a one-line doc.

The defaults are the CPU demo (small CNN on the generated dataset) and equal the
repository's ``params.yaml``, the full commented reference; a params file only needs the
keys it changes. The paper's setup per benchmark is a preset (``dcml/presets/``). Layering
(defaults < preset < params file < ``overrides``) is in :mod:`dcml.config_layers`, the
cross-field rules in :mod:`dcml.config_rules`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A parameter is unknown, missing, mistyped or inconsistent; the message names it."""


# Seeds must be valid for every consumer: faiss (k-means, NMI) stores the seed in a C
# ``int`` (< 2**31) and seeds from the clock when it is negative; numpy's generators
# (``default_rng``) take non-negative integers only; torch takes [-2**63, 2**64).
SEED_LIMIT = 2**31


def key(default: Any, doc: str) -> Any:
    """A leaf field: its default and one-line doc (``dcml params show``, tests check both)."""
    return field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    """A nested section (a dataclass) with its one-line doc."""
    return field(default_factory=cls, metadata={"doc": doc})


def doc_of(cls: type, name: str) -> str:
    return next(f.metadata.get("doc", "") for f in dataclasses.fields(cls) if f.name == name)


@dataclass(frozen=True)
class SplitConfig:
    """Class-disjoint train/test split for class-folder data: ``train_ratio``, or explicit
    ``train_classes``/``test_classes`` lists (both non-empty)."""

    train_ratio: float = key(0.5, "first fraction of the sorted class names trains, the rest tests")
    train_classes: tuple[str, ...] = key((), "or explicit training class-folder names (with test_classes)")
    test_classes: tuple[str, ...] = key((), "explicit test class-folder names (with train_classes)")


@dataclass(frozen=True)
class DemoConfig:
    """The embedded synthetic dataset (see ``dcml/data/demo.py``)."""

    images_per_class: int = key(30, "images generated per class")
    image_size: int = key(64, "generated image side in pixels")
    seed: int = key(0, "seed of the generator")


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["demo", "folder", "cub200", "cars196", "sop", "inshop", "vehicleid"] = key(
        "demo", "demo | folder | cub200 | cars196 | sop | inshop | vehicleid"
    )
    root: str = key("data/demo", "folder read by the pipeline (tracked by DVC: data.dvc / `dvc add`)")
    split: SplitConfig = section(SplitConfig, "class-disjoint split for demo/folder datasets")
    demo: DemoConfig = section(DemoConfig, "the embedded generated dataset (make demo / dcml data demo)")
    vehicleid_test_size: Literal[800, 1600, 2400] = key(800, "VehicleID test list: 800 | 1600 | 2400")
    image_size: int = key(64, "network input (RandomResizedCrop / CenterCrop size)")
    resize_size: int = key(73, "eval Resize before CenterCrop (256/224 of image_size)")
    crop_scale_min: float = key(0.35, "RandomResizedCrop smallest area fraction (paper: 0.08)")
    skip_corrupt: bool = key(False, "true: drop unreadable images (counted) instead of failing")
    num_workers: int | Literal["auto"] = key(
        0, "DataLoader worker processes, or auto (from the CPU count); results do not depend on it"
    )


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal["small_cnn", "resnet18", "resnet34", "resnet50", "efficientnet_lite0"] = key(
        "small_cnn", "small_cnn | resnet18 | resnet34 | resnet50 | efficientnet_lite0"
    )
    pretrained: str = key("none", "imagenet | none | path/to/weights.pth")
    embedding_dim: int = key(64, "d, split into K slices of d/K")
    dropout: float = key(0.01, "dropout before the embedding layer")
    freeze_bn: bool = key(False, "true: BatchNorm running stats fixed (paper, with ImageNet weights)")
    renormalize_full: bool = key(
        True, "K normalised slices concatenated to unit norm (÷ sqrt K: a constant scale, metrics unchanged)"
    )
    learners: Literal["slices", "masks"] = key(
        "slices", "slices (CVPR'19: d/K dims each) | masks (TPAMI'21: a learnable mask per learner over all d)"
    )
    mask_init: Literal["ones", "slices"] = key("ones", "masks start as ones (the authors' default) | as the slices")
    mask_decorrelation: float = key(1.0, "lambda x mean pairwise cosine similarity of relu(masks), added to the loss")
    mask_split_state: Literal["inherit", "reset"] = key(
        "inherit",
        "hierarchical split: children copy the parent's mask; their Adam moments too (inherit) or the masks' "
        "optimiser state starts empty (reset: the authors' TPAMI code, new parameters at every split)",
    )


@dataclass(frozen=True)
class LossConfig:
    name: Literal["margin", "triplet"] = key("margin", "margin | triplet")
    margin: float = key(0.2, "alpha of the margin loss, also the triplet margin")
    beta: float = key(1.2, "the margin loss's boundary beta (initial value when learnable)")
    beta_mode: Literal["fixed", "global", "per_class"] = key("fixed", "fixed | global | per_class (learnable beta)")
    beta_lr: float = key(5e-4, "learning rate of a learnable beta")
    nu: float = key(0.0, "regularisation of a learnable beta (needs beta_mode global or per_class)")
    negative_sampler: Literal["distance_weighted", "nearest_beyond_cutoff"] = key(
        "distance_weighted", "distance_weighted | nearest_beyond_cutoff (the authors' code)"
    )
    cutoff: float = key(0.5, "smallest distance the negative sampler considers")
    nonzero_loss_cutoff: float = key(1.4, "negatives farther than this give no loss")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(12, "training epochs")
    batch_size: int = key(32, "= classes per batch x images_per_class")
    images_per_class: int = key(4, "images of each class in a batch (>= 2)")
    lr_backbone: float = key(1e-3, "Adam learning rate of the backbone")
    lr_embedding: float = key(1e-3, "Adam learning rate of the embedding layer")
    lr_masks: float = key(1e-3, "model.learners: masks — their own Adam group's learning rate")
    mask_weight_decay: float = key(0.0, "model.learners: masks — weight decay of the masks' group")
    weight_decay: float = key(1e-4, "Adam weight decay (backbone and embedding)")
    lr_decay_gamma: float = key(1.0, "multiplicative learning-rate decay per epoch; 1.0 = none")
    device: Literal["auto", "cpu", "cuda"] = key("auto", "auto | cpu | cuda")
    bf16: bool = key(False, "CUDA only: bfloat16 autocast")
    channels_last: bool = key(False, "CUDA: NHWC memory format (faster ResNets with bf16)")
    cudnn_benchmark: bool = key(False, "CUDA: cuDNN autotuning (excludes deterministic)")
    tf32: bool = key(False, "CUDA: TF32 tensor-core float32 matmuls/convolutions")
    deterministic: bool = key(False, "CUDA: deterministic kernels — same seed, GPU, software → same metrics; slower")
    keep_checkpoints: int = key(1, "newest checkpoints kept per run (+ the final one); not part of the run key")
    nproc_per_node: int = key(
        1, "data-parallel training processes (torchrun: gloo on CPU, one GPU each); docs/scaling.md"
    )


@dataclass(frozen=True)
class ClusterConfig:
    num_learners: int = key(4, "K for `dcml train` (sweeps use sweep.num_learners)")
    recluster_every: int = key(2, "T, epochs between divisions")
    divide_until_epoch: int = key(8, "learners train on their clusters before this epoch")
    finetune_from_epoch: int = key(8, "K=1 on all data from this epoch")
    space: Literal["embedding", "backbone"] = key("embedding", "features clustered: embedding | backbone")
    niter: int = key(20, "k-means iterations")
    nredo: int = key(1, "k-means restarts (the best is kept)")
    max_points_per_centroid: int = key(256, "k-means subsamples beyond this many points per cluster")
    hierarchical: bool = key(False, "TPAMI'21: clusters double at each division (2, 4, .. K) by splitting each in two")


@dataclass(frozen=True)
class EvalConfig:
    """``embedding`` is how test (and clustering) embeddings are normalised:
    ``schedule`` — K per-slice-normalised slices while dividing, the normalised full
    embedding once K=1; ``slices`` — always the K normalised slices; ``full`` — always
    the normalised full embedding."""

    recall_ks: tuple[int, ...] = key((1, 2, 4, 8), "recall@k reported for these k")
    every_epochs: int = key(1, "evaluate the test split every N epochs, after epoch 0 and after the last")
    embedding: Literal["schedule", "slices", "full"] = key(
        "schedule", "test embedding: schedule (K slices while dividing, full after) | slices | full"
    )
    nmi: Literal[True, False, "final"] = key(True, "NMI: true | false | final (only at the last evaluation)")
    map_at_r: bool = key(True, "report MAP@R")
    batch_size: int = key(256, "images per batch when embedding for evaluation")


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str = key("sqlite:///mlflow.db", "MLflow tracking URI (credentials are never logged)")
    experiment: str = key("", "MLflow experiment; empty: dcml-<dataset>")
    log_model: bool = key(True, "log the final model to MLflow")


@dataclass(frozen=True)
class SweepConfig:
    num_learners: tuple[int, ...] = key((1, 4), "K values of the sweep; K=1 (the baseline) is always added")
    seeds: tuple[int, ...] = key((0,), "seeds of the sweep: each K runs once per seed")
    concurrent: bool = key(False, "the points as concurrent threads (needs a PostgreSQL-backed Prefect server)")


@dataclass(frozen=True)
class RetrievalConfig:
    """The pipeline's retrieval stages (``dvc.yaml``: embed, index, index-eval) after the sweep."""

    split: Literal["train", "test", "query", "gallery"] = key(
        "test", "the split the best model embeds and indexes: train | test | query | gallery"
    )
    factory: str = key("Flat", "faiss index_factory string: Flat (exact), or e.g. HNSW32,Flat or IVF1024,Flat")


@dataclass(frozen=True)
class Params:
    seed: int = key(0, "the run's seed (sweeps use sweep.seeds)")
    preset: str = key("none", "a file of dcml/presets/ (e.g. paper-cub200) between the defaults and params.yaml")
    data: DataConfig = section(DataConfig, "dataset, split, image sizes, augmentation, loader workers")
    model: ModelConfig = section(ModelConfig, "backbone, weights, embedding, learners")
    loss: LossConfig = section(LossConfig, "margin or triplet loss")
    train: TrainConfig = section(TrainConfig, "epochs, batches, optimiser, device switches")
    cluster: ClusterConfig = section(ClusterConfig, "K, the division schedule, k-means")
    eval: EvalConfig = section(EvalConfig, "test evaluation: recall@k, cadence, NMI, MAP@R")
    tracking: TrackingConfig = section(TrackingConfig, "MLflow")
    sweep: SweepConfig = section(SweepConfig, "the K x seed sweep")
    retrieval: RetrievalConfig = section(RetrievalConfig, "after the sweep: embed, index, evaluate the best model")
