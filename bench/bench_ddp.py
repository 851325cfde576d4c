"""Data-parallel throughput: our training loop on 1 process vs N processes under torchrun.

Each measurement launches ``torchrun --standalone --nproc-per-node=n`` on this file; every
rank builds the same trainer (:meth:`Trainer.create`), trains a warm-up epoch and then a
timed epoch with :meth:`Trainer.train_segment` — the path ``train.nproc_per_node`` runs —
over in-memory images (no JPEG decoding: this measures compute and gradient all-reduce).
The global batch is the same for every n (as in dcml: ``train.batch_size`` is the global
batch, split over the ranks), so the speed-up is strong scaling. Rank 0 reports the epoch's
img/s (global images per second). One JSON object; ``speedup`` relative to 1 process.

    python bench/bench_ddp.py                      # CUDA: 1 vs all GPUs; CPU: 1 vs 2 processes
    python bench/bench_ddp.py --nproc 1 2 4 8 --backbone resnet50 --image-size 224 --batch-size 256 --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    InMemoryImages,
    RunConfig,
    add_switch_arguments,
    balanced_labels,
    division_by_class,
    make_params,
    parse_workers,
    run_config_from_args,
    segment,
)

from dcml import distributed  # noqa: E402
from dcml.device import available_cpus, resolve_device  # noqa: E402
from dcml.trainer import Trainer  # noqa: E402


def rank_main(args: argparse.Namespace) -> None:
    """One rank: warm-up epoch, timed epoch; rank 0 writes the report to ``args.report``."""
    device_type = resolve_device(args.device).type
    shard = distributed.shard_from_env()
    device = resolve_device(args.device)
    if shard.world > 1:
        shard, device = distributed.init(device_type)
    config = run_config_from_args(args)
    with tempfile.TemporaryDirectory() as folder:
        params = make_params(config, Path(folder))
    labels = balanced_labels(args.steps, config.batch_size, config.num_learners)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(min(len(labels), 512), 3, config.image_size, config.image_size, generator=generator)
    dataset = InMemoryImages(pool, labels)
    division = division_by_class(labels, config.num_learners)
    trainer = Trainer.create(params, int(labels.max()) + 1, device)
    for epoch in range(2):  # warm-up (allocations, cuDNN autotuning, NCCL set-up), timed
        [stats] = trainer.train_segment(segment(epoch, config.num_learners), dataset, labels, division, shard=shard)
    if distributed.is_main(shard):
        report = {
            "processes": shard.world,
            "images_per_second": stats.images_per_second,
            "seconds": stats.seconds,
            "steps": stats.num_batches,
            "global_batch": config.batch_size,
            "loss": stats.loss,
        }
        Path(args.report).write_text(json.dumps(report))
    distributed.close()


def measure(nproc: int, argv: list[str]) -> dict:
    """Run this file under torchrun with ``nproc`` ranks; rank 0's report."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, available_cpus() // nproc))}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        command += [__file__, "--rank-mode", "--report", str(report), *argv]
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0 or not report.exists():
            return {"processes": nproc, "error": (result.stdout + result.stderr)[-2000:]}
        return {**json.loads(report.read_text()), "wall_seconds_with_start": wall}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", help="process counts (default: 1 and all GPUs, or 1 2 on CPU)")
    parser.add_argument("--backbone", help="default: resnet50 on CUDA, small_cnn on CPU")
    parser.add_argument("--image-size", type=int, help="default: 224 on CUDA, 64 on CPU")
    parser.add_argument("--batch-size", type=int, help="global batch (default: 256 on CUDA, 32 on CPU)")
    parser.add_argument("--num-learners", "-k", type=int, default=4)
    parser.add_argument("--steps", type=int, help="steps per epoch (default: 100 on CUDA, 20 on CPU)")
    parser.add_argument("--num-workers", type=parse_workers, default=0, help="loader workers per rank")
    parser.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    add_switch_arguments(parser)
    args = parser.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    args.backbone = args.backbone or ("resnet50" if cuda else "small_cnn")
    args.image_size = args.image_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (100 if cuda else 20)
    args.nproc = args.nproc or ([1, torch.cuda.device_count()] if cuda else [1, 2])
    return args


def forwarded(args: argparse.Namespace) -> list[str]:
    """The arguments each rank gets: every option, resolved."""
    options = {
        "--device": args.device,
        "--backbone": args.backbone,
        "--image-size": args.image_size,
        "--batch-size": args.batch_size,
        "--num-learners": args.num_learners,
        "--steps": args.steps,
        "--freeze-bn": args.freeze_bn,
        "--num-workers": args.num_workers,
    }
    flags = {"--bf16": args.bf16, "--channels-last": args.channels_last}
    flags |= {"--cudnn-benchmark": args.cudnn_benchmark, "--tf32": args.tf32}
    return [str(part) for pair in options.items() for part in pair] + [flag for flag, on in flags.items() if on]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rank_mode:
        rank_main(args)
        return
    config: RunConfig = run_config_from_args(args)
    results = [measure(n, forwarded(args)) for n in sorted(set(args.nproc))]
    base = next((r["images_per_second"] for r in results if r["processes"] == 1 and "error" not in r), None)
    for result in results:
        if base and "images_per_second" in result:
            result["speedup"] = result["images_per_second"] / base
    print(
        json.dumps(
            {
                "device": resolve_device(args.device).type,
                "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                "cpus": available_cpus(),
                "config": {**config.__dict__, "steps": args.steps},
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
            default=lambda value: value if not isinstance(value, np.generic) else value.item(),
        )
    )


if __name__ == "__main__":
    main()
