"""Shared pieces of the benchmarks: configs, the resume path, bare torch loops, JPEG folders.

Our loop is always measured the way the pipeline runs it: a :class:`~dcml.trainer.Trainer`
trains a warm-up epoch, is saved with :meth:`Trainer.save`, restored with
:meth:`Trainer.from_checkpoint` (a fresh trainer whose optimiser state came from a file,
as in every Prefect task after the first) and then trains the timed epoch with
:meth:`Trainer.train_segment`. The bare loop is the same model, loss and optimiser
(:meth:`Trainer.create`) stepping over batches that are already on the device.

The scripts import this file as ``common`` (their own folder is put on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dcml.config import Params, params_from_dict, to_dict
from dcml.data import build_bundle, load_splits
from dcml.device import resolve_num_workers
from dcml.division import Division
from dcml.schedule import Segment
from dcml.train import EpochBatchSampler, epoch_batches, train_loader
from dcml.trainer import Trainer, epoch_seed

IMAGES_PER_CLASS = 4  # M of the paper's batches (P classes x 4 images)
TEST_CLASS = "zz-test"  # the one test class of generated folders (the training split is what we time)


# ---------------------------------------------------------------------------- small helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_workers(value: str) -> int | str:
    """``--num-workers``: an integer, or a word such as ``auto`` passed to the config as is."""
    return int(value) if value.strip().lstrip("-").isdigit() else value.strip()


def add_switch_arguments(parser) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    """Options shared by bench_train_step and bench_loader: device, BN and speed switches."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--freeze-bn", default="auto", choices=["auto", "true", "false"], help="auto: ResNets")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="train.cudnn_benchmark (CUDA)")
    parser.add_argument("--tf32", action="store_true", help="train.tf32 (CUDA)")


def run_config_from_args(args) -> RunConfig:  # noqa: ANN001 - argparse.Namespace
    """The :class:`RunConfig` of the options of :func:`add_switch_arguments` and the scripts'
    --backbone/--image-size/--batch-size/--num-learners/--num-workers."""
    return RunConfig(
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_learners=args.num_learners,
        num_workers=args.num_workers,
        bf16=args.bf16,
        channels_last=args.channels_last,
        cudnn_benchmark=args.cudnn_benchmark,
        tf32=args.tf32,
        freeze_bn=resolve_freeze_bn(args.freeze_bn, args.backbone),
    )


def resolve_freeze_bn(choice: str, backbone: str) -> bool:
    """``auto``: frozen BatchNorm for ResNets (as in the paper presets), not for small_cnn."""
    if choice == "auto":
        return backbone != "small_cnn"
    return choice in ("true", "on", "yes", "1")


def backend_switches() -> dict[str, Any]:
    """torch's global cudnn/TF32 switches as they are now (set by ``Trainer.create`` from
    ``train.cudnn_benchmark``/``train.tf32`` via ``dcml.device.configure_backend``)."""
    return {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
    }


def error_report(error: BaseException) -> dict[str, str]:
    tail = traceback.format_exception(type(error), error, error.__traceback__)
    return {"error": f"{type(error).__name__}: {error}", "traceback_tail": "".join(tail)[-1500:]}


def run_section(name: str, fn: Callable[[], dict[str, Any]], report: dict[str, Any], log=print) -> None:
    """``report[name] = fn()`` plus its seconds; an exception becomes ``{"error": ...}``."""
    log(f"[bench] {name} ...")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:  # a failing section must not stop the others
        result = error_report(error)
    with contextlib.suppress(Exception):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    result["seconds"] = round(time.perf_counter() - start, 2)
    report[name] = result
    log(f"[bench] {name}: {result.get('error', 'ok')} ({result['seconds']} s)")


def round_floats(value: Any, digits: int = 3) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_floats(v, digits) for v in value]
    return value


@contextlib.contextmanager
def temp_folder(parent: str | None = None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dcml-bench-", dir=parent) as folder:
        yield Path(folder)


# ---------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RunConfig:
    """What both loops share: network, input, batch, precision, device."""

    backbone: str = "small_cnn"
    image_size: int = 64
    batch_size: int = 32
    num_learners: int = 4  # K; > 1 trains the divide phase (learner slices), 1 the full embedding
    num_workers: int | str = 0
    bf16: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    tf32: bool = False
    freeze_bn: bool = False
    embedding_dim: int = 128
    seed: int = 0


def random_backbone_weights(backbone: str, folder: Path) -> str:
    """A local ``.pth`` state dict of a randomly initialised backbone.

    ``model.freeze_bn: true`` (the paper presets) needs ``model.pretrained`` != none, and
    ImageNet weights cannot be downloaded offline; random weights cost the same to train.
    """
    from dcml.model import build_backbone

    path = folder / f"{backbone}-random.pth"
    if not path.exists():
        module, _ = build_backbone(backbone, "none")
        torch.save(module.state_dict(), path)
    return str(path)


def make_params(config: RunConfig, folder: Path, *, data_root: str = "unused", **data: Any) -> Params:
    """Validated :class:`Params` for the benchmark (paper learning rates, margin loss)."""
    raw = to_dict(Params())
    pretrained = random_backbone_weights(config.backbone, folder) if config.freeze_bn else "none"
    raw["seed"] = config.seed
    raw["data"].update(
        {
            "dataset": "folder",
            "root": data_root,
            "num_workers": config.num_workers,
            "image_size": config.image_size,  # the bare loop's batches have this size too
            "resize_size": max(config.image_size, round(config.image_size * 256 / 224)),
            "crop_scale_min": 0.08,  # the paper's RandomResizedCrop
            **data,
        }
    )
    raw["model"].update(
        {
            "backbone": config.backbone,
            "pretrained": pretrained,
            "freeze_bn": config.freeze_bn,
            "embedding_dim": config.embedding_dim,
        }
    )
    raw["train"].update(
        {
            "batch_size": config.batch_size,
            "images_per_class": IMAGES_PER_CLASS,
            "epochs": 1000,
            "lr_backbone": 1e-5,  # the paper's (the built-in defaults are the CPU demo's 1e-3)
            "lr_embedding": 1e-5,
            "bf16": config.bf16,
            "channels_last": config.channels_last,
            "cudnn_benchmark": config.cudnn_benchmark,  # applied by Trainer.create
            "tf32": config.tf32,
        }
    )
    raw["cluster"].update(
        {"num_learners": config.num_learners, "divide_until_epoch": 1000, "finetune_from_epoch": 1000}
    )
    raw["sweep"]["num_learners"] = [config.num_learners]
    return params_from_dict(raw)


def loader_workers(params: Params, device: torch.device) -> int:
    """The worker count our training uses for ``params.data.num_workers``."""
    return resolve_num_workers(params.data.num_workers, device)


def segment(epoch: int, num_learners: int) -> Segment:
    """One epoch of the divide phase (K learners) or, for K=1, of the full embedding."""
    if num_learners > 1:
        return Segment(epoch, epoch + 1, "divide", recluster=False, num_clusters=num_learners)
    return Segment(epoch, epoch + 1, "finetune", recluster=False, num_clusters=1)


def division_by_class(labels: np.ndarray, num_learners: int, keep: np.ndarray | None = None) -> Division:
    """Whole classes dealt round-robin to the K learners (what a clustering would give)."""
    assignment = (np.asarray(labels) % num_learners).astype(np.int64)
    keep = np.ones(len(assignment), dtype=bool) if keep is None else keep
    return Division(assignment, keep, num_learners, 0, {})


# ---------------------------------------------------------------------------- our loop, resumed


@dataclass
class Resumed:
    trainer: Trainer
    load_seconds: float
    adam_step_device: str
    checkpoint_mib: float


def resume(params: Params, num_classes: int, device: torch.device, folder: Path, warm: Callable[[Trainer], None]):
    """Trainer.create -> ``warm(trainer)`` (trains epoch 0) -> save -> from_checkpoint."""
    trainer = Trainer.create(params, num_classes, device)
    warm(trainer)
    sync(device)
    path = trainer.save(folder / f"epoch-{trainer.epochs_done:04d}.pt")
    del trainer
    start = time.perf_counter()
    restored = Trainer.from_checkpoint(path, device)
    sync(device)
    seconds = time.perf_counter() - start
    steps = [s["step"] for s in restored.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    step_device = str(steps[0].device) if steps else "no Adam state"
    size = path.stat().st_size / 2**20
    path.unlink()
    return Resumed(restored, seconds, step_device, size)


def timed_segment(trainer: Trainer, epoch: int, dataset: Dataset, labels: np.ndarray, division: Division):
    """(images/s measured outside, images/s of EpochStats, seconds, images) of one epoch."""
    sync(trainer.device)
    start = time.perf_counter()
    (stats,) = trainer.train_segment(segment(epoch, division.num_clusters), dataset, labels, division)
    sync(trainer.device)
    seconds = time.perf_counter() - start
    return stats.num_images / seconds, stats.images_per_second, seconds, stats.num_images


# ---------------------------------------------------------------------------- bare torch loop


class BareLoop:
    """Same model, loss and optimiser as our loop (``Trainer.create``), batches already on
    the device (copied, pinned, channels_last'd before any timing), nothing else."""

    def __init__(self, params: Params, num_classes: int, device: torch.device, num_batches_in_pool: int = 4) -> None:
        trainer = Trainer.create(params, num_classes, device)
        self.model, self.loss, self.optimizer = trainer.model, trainer.loss, trainer.optimizer
        self.device = device
        t = params.train
        self.batch_size, self.num_learners = t.batch_size, params.cluster.num_learners
        self.bf16, size = t.bf16, params.data.image_size
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        generator = torch.Generator().manual_seed(params.seed)
        pool = torch.randn(num_batches_in_pool * t.batch_size, 3, size, size, generator=generator)
        self.images = pool.to(device).contiguous(memory_format=memory_format)
        self.num_batches_in_pool = num_batches_in_pool
        # P classes x M images, like a class-balanced batch; class ids as in a real epoch
        self.labels = (torch.arange(t.batch_size) // t.images_per_class).to(device)
        self.generator = torch.Generator(device=device).manual_seed(params.seed + 1)
        self.steps_done = 0
        self.model.train()

    def step(self) -> None:
        i = self.steps_done
        b = i % self.num_batches_in_pool
        images = self.images[b * self.batch_size : (b + 1) * self.batch_size]
        learner = i % self.num_learners if self.num_learners > 1 else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.device.type == "cuda"):
            embeddings = self.model(images, num_learners=self.num_learners, learner=learner)
        value = self.loss(embeddings.float(), self.labels, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        value.backward()
        self.optimizer.step()
        self.steps_done += 1

    def images_per_second(self, steps: int, warmup: int) -> float:
        for _ in range(warmup):
            self.step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- in-memory dataset


class InMemoryImages(Dataset):
    """``(image, label, index)`` like dcml's ImageDataset, from a pool of CPU tensors
    (index ``i`` shows pool image ``i % len(pool)``, so large epochs need little memory)."""

    def __init__(self, pool: torch.Tensor, labels: np.ndarray) -> None:
        self.pool, self.labels = pool, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]):
        index = key[0] if isinstance(key, tuple) else key  # (index, transform seed) from EpochBatchSampler
        return self.pool[index % len(self.pool)], int(self.labels[index]), int(index)


def balanced_labels(num_batches: int, batch_size: int, num_learners: int) -> np.ndarray:
    """Labels of exactly ``num_batches`` class-balanced batches per epoch (rounded up to a
    multiple of K): classes of M images, class c with learner c % K."""
    num_batches = num_learners * math.ceil(num_batches / num_learners)
    return np.arange(num_batches * batch_size) // IMAGES_PER_CLASS


# ---------------------------------------------------------------------------- host syncs


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Count CUDA synchronising operations (``torch.cuda.set_sync_debug_mode('warn')``) by
    the Python line that issued them. CUDA only."""
    counts: Counter = Counter()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for warning in caught:
        if "synchroniz" in str(warning.message):
            counts[f"{_short_path(warning.filename)}:{warning.lineno}"] += 1


def _short_path(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("dcml", "torch", "bench"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) - 1 :])
    return Path(filename).name


def sync_summary(counts: Counter, steps: int) -> dict[str, Any]:
    total = sum(counts.values())
    return {
        "steps": steps,
        "syncs": total,
        "syncs_per_step": round(total / max(steps, 1), 2),
        "by_line_per_step": {line: round(n / max(steps, 1), 2) for line, n in counts.most_common(12)},
    }


# ---------------------------------------------------------------------------- training-step benchmark


def train_step_bench(
    config: RunConfig,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    folder: Path,
    repeats: int = 1,
    continuing: bool = True,
    sync_steps: int = 0,
) -> dict[str, Any]:
    """Our loop (resumed Trainer, in-memory dataset) vs the bare loop, images/s.

    Each of ``repeats`` rounds times one epoch of every loop, interleaved (bare, continuing,
    resumed), and the medians are reported, so a busy machine hits all loops alike.
    ``continuing`` also times the trainer that trained the warm-up epoch itself (no
    checkpoint round trip), so resume cost shows as the difference. ``sync_steps`` > 0
    (CUDA) counts host syncs per step of both loops afterwards (untimed).
    """
    params = make_params(config, folder)
    size, k = config.image_size, config.num_learners
    labels = balanced_labels(steps, config.batch_size, k)
    warm_labels = balanced_labels(max(warmup, 1), config.batch_size, k)
    num_classes = int(labels.max()) + 1
    pool = torch.randn(min(len(labels), 4 * config.batch_size), 3, size, size)
    dataset, warm_dataset = InMemoryImages(pool, labels), InMemoryImages(pool, warm_labels)
    division, warm_division = division_by_class(labels, k), division_by_class(warm_labels, k)
    report: dict[str, Any] = {"num_workers_resolved": loader_workers(params, device)}

    bare = BareLoop(params, num_classes, device)
    saved: list[Trainer] = []

    def warm(trainer: Trainer) -> None:
        trainer.train_segment(segment(0, k), warm_dataset, warm_labels, warm_division)
        if continuing:
            saved.append(trainer)  # goes on without the checkpoint round trip

    resumed = resume(params, num_classes, device, folder, warm)
    runs: dict[str, list[float]] = {"bare": [], "continuing": [], "resumed": [], "resumed_epoch_stats": []}
    num_batches = len(labels) // config.batch_size
    for r in range(repeats):
        runs["bare"].append(bare.images_per_second(num_batches, warmup if r == 0 else 0))
        if continuing:
            runs["continuing"].append(timed_segment(saved[0], 1 + r, dataset, labels, division)[0])
        ips, stats_ips, _, images = timed_segment(resumed.trainer, 1 + r, dataset, labels, division)
        runs["resumed"].append(ips)
        runs["resumed_epoch_stats"].append(stats_ips)
    saved.clear()
    bare_ips, ips = float(np.median(runs["bare"])), float(np.median(runs["resumed"]))
    report |= {
        "bare_images_per_s": bare_ips,
        "dcml_images_per_s": ips,
        "dcml_epoch_stats_images_per_s": float(np.median(runs["resumed_epoch_stats"])),
        "timed_images": images,
        "timed_batches": images // config.batch_size,
        "repeats": repeats,
        "resume_load_s": resumed.load_seconds,
        "checkpoint_mib": resumed.checkpoint_mib,
        "adam_step_device_after_resume": resumed.adam_step_device,
        "ratio_dcml_to_bare": ips / bare_ips,
        "overhead_percent": 100 * (bare_ips - ips) / bare_ips,
    }
    if continuing:
        cont = float(np.median(runs["continuing"]))
        report["dcml_continuing_images_per_s"] = cont
        report["resume_slowdown_percent"] = 100 * (cont - ips) / cont
    if repeats > 1:
        report["runs_images_per_s"] = {key: values for key, values in runs.items() if values}

    if sync_steps > 0:
        if device.type != "cuda":
            report["host_syncs"] = {"skipped": "needs CUDA (torch.cuda.set_sync_debug_mode)"}
        else:
            report["host_syncs"] = host_sync_check(resumed.trainer, bare, sync_steps, config, pool)
    return round_floats(report)


def host_sync_check(trainer: Trainer, bare: BareLoop, steps: int, config: RunConfig, pool: torch.Tensor):
    """Host syncs per step of our (resumed) loop and of the bare loop, counted after warm-up."""
    out: dict[str, Any] = {}
    labels = balanced_labels(steps, config.batch_size, config.num_learners)
    division = division_by_class(labels, config.num_learners)
    dataset = InMemoryImages(pool, labels)
    epoch = trainer.epochs_done
    try:
        with count_host_syncs() as counts:
            (stats,) = trainer.train_segment(segment(epoch, config.num_learners), dataset, labels, division)
        out["dcml"] = sync_summary(counts, stats.num_batches)
    except Exception as error:
        out["dcml"] = error_report(error)
    try:
        with count_host_syncs() as counts:  # warnings come at dispatch: no sync needed inside
            for _ in range(steps):
                bare.step()
        sync(bare.device)
        out["bare"] = sync_summary(counts, steps)
    except Exception as error:
        out["bare"] = error_report(error)
    if all(isinstance(out[key], dict) and out[key].get("syncs") == 0 for key in ("dcml", "bare")):
        out["note"] = "no sync warning caught in either loop (the loss's nonzero should sync): check the counting"
    return out


# ---------------------------------------------------------------------------- JPEG class folders


def parse_size(text: str) -> tuple[int, int]:
    """``"224"`` -> (224, 224); ``"500x375"`` -> (500, 375) (width x height)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _write_jpeg(path: Path, size: tuple[int, int], seed: list[int], quality: int) -> int:
    rng = np.random.default_rng(seed)
    width, height = size
    # smooth colour field + mild noise: compresses and decodes like a photo, not like noise
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return path.stat().st_size


def write_jpeg_folder(
    root: Path,
    num_images: int,
    *,
    size: tuple[int, int] = (224, 224),
    images_per_class: int = 8,
    quality: int = 90,
    seed: int = 0,
) -> dict[str, Any]:
    """``root/<class>/<i>.jpg``: ``num_images`` training images in classes of
    ``images_per_class``, plus a two-image test class (:data:`TEST_CLASS`)."""
    start = time.perf_counter()
    jobs = []
    for i in range(num_images):
        folder = root / f"c{i // images_per_class:05d}"
        jobs.append((folder / f"{i:06d}.jpg", [seed, i]))
    jobs += [(root / TEST_CLASS / f"{i}.jpg", [seed, num_images + i]) for i in range(2)]
    for folder in {path.parent for path, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(lambda job: _write_jpeg(job[0], size, job[1], quality), jobs))
    return {
        "images": num_images,
        "classes": math.ceil(num_images / images_per_class),
        "size": f"{size[0]}x{size[1]}",
        "quality": quality,
        "mean_kib": round(float(np.mean(sizes)) / 1024, 1),
        "write_s": round(time.perf_counter() - start, 2),
    }


def folder_params(config: RunConfig, root: Path, folder: Path) -> Params:
    """Params reading ``root`` as a ``folder`` dataset: every generated class trains."""
    train_classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != TEST_CLASS)
    data = {
        "data_root": str(root),
        "split": {"train_ratio": 0.5, "train_classes": train_classes, "test_classes": [TEST_CLASS]},
    }
    return make_params(config, folder, **data)


# ---------------------------------------------------------------------------- loader benchmark


def loader_bench(
    config: RunConfig,
    device: torch.device,
    root: Path,
    folder: Path,
    *,
    warmup: int = 3,
    repeats: int = 1,
) -> dict[str, Any]:
    """A full epoch of our loop over JPEG files (loader + step, through the resume path),
    the same epoch's batches through our DataLoader alone, and the bare loop on in-memory
    tensors for as many batches. ``repeats`` interleaved rounds; medians reported."""
    params = folder_params(config, root, folder)
    splits = load_splits(params.data)
    bundle = build_bundle(splits, params.data)
    labels = splits.train.labels
    k = config.num_learners
    division = division_by_class(labels, k)
    # warm-up epoch 0 on the first few classes only (keep mask), so it stays short
    classes_per_batch = config.batch_size // IMAGES_PER_CLASS
    warm_keep = labels < max(warmup, 1) * classes_per_batch * k
    warm_division = division_by_class(labels, k, keep=warm_keep)
    report: dict[str, Any] = {"num_workers": params.data.num_workers}
    report["num_workers_resolved"] = loader_workers(params, device)
    report["train_images"] = len(labels)

    resumed = resume(
        params,
        splits.train.num_classes,
        device,
        folder,
        lambda trainer: trainer.train_segment(segment(0, k), bundle.train, labels, warm_division),
    )
    bare = BareLoop(params, splits.train.num_classes, device)
    runs: dict[str, list[float]] = {"dcml": [], "dcml_epoch_stats": [], "loader": [], "bare": []}
    for r in range(repeats):
        ips, stats_ips, seconds, images = timed_segment(resumed.trainer, 1 + r, bundle.train, labels, division)
        runs["dcml"].append(ips)
        runs["dcml_epoch_stats"].append(stats_ips)
        loader = loader_only(params, bundle.train, labels, division, device, epoch=1 + r)
        runs["loader"].append(loader.pop("loader_images_per_s"))
        num_batches = images // config.batch_size
        runs["bare"].append(bare.images_per_second(num_batches, warmup if r == 0 else 0))
    del resumed, bare
    ips, bare_ips, loader_ips = (float(np.median(runs[key])) for key in ("dcml", "bare", "loader"))
    report |= {
        "dcml_images_per_s": ips,
        "dcml_epoch_stats_images_per_s": float(np.median(runs["dcml_epoch_stats"])),
        "loader_images_per_s": loader_ips,
        "bare_images_per_s": bare_ips,
        "ratio_dcml_to_bare": ips / bare_ips,
        "overhead_percent": 100 * (bare_ips - ips) / bare_ips,
        "bound_images_per_s": min(loader_ips, bare_ips),
        "ratio_dcml_to_bound": ips / min(loader_ips, bare_ips),
        "epoch_images": images,
        "epoch_batches": num_batches,
        "last_epoch_s": seconds,
        "repeats": repeats,
        **loader,
    }
    if repeats > 1:
        report["runs_images_per_s"] = runs
    return round_floats(report)


def loader_only(
    params: Params, dataset: Dataset, labels: np.ndarray, division: Division, device: torch.device, *, epoch: int
) -> dict[str, Any]:
    """Iterate the epoch's batches through the DataLoader our training uses, copying each
    batch to the device, without a step."""
    t = params.train
    batches = epoch_batches(
        division,
        labels,
        per_learner=division.num_clusters > 1,
        batch_size=t.batch_size,
        images_per_class=t.images_per_class,
        seed=params.seed,
        epoch=epoch,
    )
    workers = loader_workers(params, device)
    loader, source = training_loader(dataset, batches, workers, device, epoch_seed(params.seed, epoch))
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    torch.manual_seed(params.seed)
    sync(device)
    start = time.perf_counter()
    first, first_count, count = 0.0, 0, 0
    for images, _, _ in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        count += len(images)
        if not first_count:
            sync(device)
            first, first_count = time.perf_counter() - start, count
    sync(device)
    seconds = time.perf_counter() - start
    steady = (count - first_count) / (seconds - first) if count > first_count else None
    return {
        "loader_images_per_s": count / seconds,
        "loader_first_batch_s": first,  # worker start-up + first batch
        "loader_after_first_batch_images_per_s": steady,
        "loader_workers": workers,
        "loader_source": source,
    }


def training_loader(dataset: Dataset, batches, workers: int, device: torch.device, seed: int):
    """(loader, description): ``dcml.train.train_loader`` with an ``EpochBatchSampler`` set to ``batches``."""
    sampler = EpochBatchSampler()
    sampler.set_epoch(batches, seed)
    loader = train_loader(dataset, sampler, num_workers=workers, device=device)
    return loader, "dcml.train.train_loader (the segment's loader of Trainer.train_segment)"
