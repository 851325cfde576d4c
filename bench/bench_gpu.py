"""GPU benchmark in one command: prints one JSON object (``make bench-gpu``).

Sections (each one fails on its own: its error lands in the JSON and the others run):

- ``environment``: torch/torchvision/CUDA/cuDNN versions, GPU name, CPUs, faiss build and
  whether faiss sees a GPU.
- ``train_step``: ResNet-50 (``--quick``: ResNet-18) at 224 px, batch 80, K=4 learners, bf16 autocast,
  channels_last, cudnn.benchmark and TF32 (``train.*`` switches): images/s of our
  training step (``Trainer.train_segment`` on a trainer restored with
  ``Trainer.from_checkpoint``, in-memory data through our DataLoader) vs a bare torch
  loop (same model/loss/optimiser, batches already on the GPU); with ``host_syncs``:
  CUDA synchronisations per step of both loops (``torch.cuda.set_sync_debug_mode``),
  by source line.
- ``loader``: JPEG files (2,000 at 224 px by default) read as dcml's ``folder``
  dataset: one epoch of our loop (loader + step), our DataLoader alone, and the bare
  loop; ``data.num_workers`` from ``--num-workers`` (default ``auto``).
- ``decode``: JPEG decoding images/s of the same files: PIL and torchvision on one CPU
  thread, and ``torchvision.io.decode_jpeg(..., device="cuda")`` in batches (CUDA).
- ``faiss_kmeans``: ``dcml.clustering.kmeans``, K=8 on 60,000 x 128 float32, with the
  project's subsampling (max 256 points per centroid) and on all points.
- ``faiss_knn``: ``dcml.metrics.knn`` (60,000 x 128, k=1000, self excluded) and
  ``dcml.metrics.evaluate_retrieval`` (Recall@1/10/100/1000, MAP@R) on the same data.

faiss runs wherever dcml puts it (``use_gpu=None``: the GPU when faiss sees one).
Warm-up steps are excluded from every timing and CUDA is synchronised before clocks are
read. On an H100/H200 the whole run takes a few minutes. ``--device cpu --quick`` runs
every section with tiny sizes (CUDA-only parts report ``skipped``) to test the script.

    .venv/bin/python bench/bench_gpu.py                      # on the GPU machine
    .venv/bin/python bench/bench_gpu.py --device cpu --quick # smoke test anywhere
    .venv/bin/python bench/bench_gpu.py --sections train_step --steps 50 --out gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RunConfig,
    backend_switches,
    loader_bench,
    parse_size,
    parse_workers,
    round_floats,
    run_section,
    sync,
    temp_folder,
    train_step_bench,
    write_jpeg_folder,
)

from dcml.device import available_cpus, resolve_device  # noqa: E402

SECTIONS = ("environment", "train_step", "loader", "decode", "faiss_kmeans", "faiss_knn")
FULL = {
    "image_size": 224,
    "batch_size": 80,
    "steps": 30,
    "warmup": 5,
    "repeats": 3,
    "sync_steps": 10,
    "loader_images": 2000,
    "faiss_n": 60_000,
    "faiss_dim": 128,
    "knn_k": 1000,
}
QUICK = {
    "image_size": 64,
    "batch_size": 16,
    "steps": 4,
    "warmup": 1,
    "repeats": 1,
    "sync_steps": 2,
    "loader_images": 64,
    "faiss_n": 4000,
    "faiss_dim": 32,
    "knn_k": 100,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason}


# ---------------------------------------------------------------------------- sections


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    from dcml import faiss_backend

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "cpus": available_cpus(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {
            "gpu": props.name,
            "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_count": torch.cuda.device_count(),
        }
        with contextlib.suppress(Exception):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            out["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    out["faiss_sees_gpu"] = faiss_backend.gpu_available()
    out["faiss"] = faiss_backend.build_info()
    return out


def train_step(args, device: torch.device, folder: Path) -> dict[str, Any]:
    config = run_config(args, num_learners=args.num_learners, num_workers=args.train_step_workers)
    result = train_step_bench(
        config,
        device,
        steps=args.steps,
        warmup=args.warmup,
        folder=folder,
        repeats=args.repeats,
        continuing=True,
        sync_steps=args.sync_steps,
    )
    return {"num_workers": args.train_step_workers, **result, "backend_switches": backend_switches()}


def loader(args, device: torch.device, folder: Path, jpegs: Path) -> dict[str, Any]:
    config = run_config(args, num_learners=1, num_workers=args.num_workers)
    return loader_bench(config, device, jpegs, folder, warmup=args.warmup, repeats=max(1, args.repeats - 1))


def decode(args, device: torch.device, jpegs: Path) -> dict[str, Any]:
    import torchvision
    from PIL import Image
    from torchvision.io import decode_jpeg

    files = sorted(jpegs.rglob("*.jpg"))
    datas = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in files]
    out: dict[str, Any] = {"files": len(files), "note": "decode only: no crop, flip or normalisation"}
    sample = files[: min(len(files), 300)]
    start = time.perf_counter()
    for path in sample:
        with Image.open(path) as image:
            image.convert("RGB").load()
    out["pil_1_thread_images_per_s"] = len(sample) / (time.perf_counter() - start)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for data in datas[: len(sample)]:
            decode_jpeg(data)
        out["torchvision_cpu_1_thread_images_per_s"] = len(sample) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    if device.type != "cuda":
        out["cuda_batched"] = skipped("needs CUDA")
        return out
    batch = args.batch_size
    decode_jpeg(datas[:batch], device=device)  # nvjpeg initialisation and warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(datas), batch):
        decode_jpeg(datas[i : i + batch], device=device)
    sync(device)
    seconds = time.perf_counter() - start
    out["cuda_batched"] = {
        "batch": batch,
        "images_per_s": len(datas) / seconds,
        "torchvision": torchvision.__version__,
    }
    return out


def faiss_kmeans(args) -> dict[str, Any]:
    from dcml.clustering import kmeans
    from dcml.faiss_backend import gpu_available

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.faiss_n, args.faiss_dim), dtype=np.float32)
    out: dict[str, Any] = {"n": args.faiss_n, "dim": args.faiss_dim, "k": 8, "niter": 20, "gpu": gpu_available()}
    start = time.perf_counter()
    kmeans(x[:1000], 8, niter=2, seed=0)  # GPU resources / thread pools are created once
    out["first_use_s"] = time.perf_counter() - start
    for name, points in (("project_settings", 256), ("all_points", args.faiss_n // 8 + 1)):
        start = time.perf_counter()
        assignment = kmeans(x, 8, niter=20, seed=0, max_points_per_centroid=points)
        out[name] = {
            "max_points_per_centroid": points,
            "seconds": time.perf_counter() - start,
            "cluster_sizes": np.bincount(assignment, minlength=8).tolist(),
        }
    return out


def faiss_knn(args) -> dict[str, Any]:
    from dcml.faiss_backend import GPU_MAX_K, gpu_available
    from dcml.metrics import evaluate_retrieval, knn

    rng = np.random.default_rng(0)
    n, dim, k = args.faiss_n, args.faiss_dim, args.knn_k
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, max(2, n // 5), n)  # ~5 images per class, like SOP
    out: dict[str, Any] = {"n": n, "dim": dim, "k": k, "gpu": gpu_available() and k + 1 <= GPU_MAX_K}
    knn(x[:1000], x[:1000], 10)  # first use (GPU resources) outside the timings
    start = time.perf_counter()
    distances, _ = knn(x, x, k, exclude_self=True)
    out["knn_s"] = time.perf_counter() - start
    out["knn_shape"] = list(distances.shape)
    del distances
    ks = tuple(sorted({1, 10, 100, k}))
    start = time.perf_counter()
    metrics = evaluate_retrieval(x, labels, ks, with_nmi=False)
    out["evaluate_retrieval_s"] = time.perf_counter() - start
    out["evaluate_retrieval_ks"] = list(ks)
    out["metrics"] = metrics
    return out


# ---------------------------------------------------------------------------- driver


def run_config(args, *, num_learners: int, num_workers: int | str) -> RunConfig:
    return RunConfig(
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_learners=num_learners,
        num_workers=num_workers,
        bf16=not args.no_bf16,
        channels_last=not args.no_channels_last,
        cudnn_benchmark=not args.no_cudnn_benchmark,
        tf32=not args.no_tf32,
        freeze_bn=args.backbone != "small_cnn",  # the paper presets: frozen BN with "pretrained" weights
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, e.g. with --device cpu)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--backbone", default=None, choices=["small_cnn", "resnet18", "resnet34", "resnet50"], help="default resnet50"
    )
    parser.add_argument("--num-learners", type=int, default=4, help="K of the train_step section")
    parser.add_argument("--num-workers", type=parse_workers, default="auto", help="loader section: N or auto")
    parser.add_argument("--train-step-workers", type=parse_workers, default=0, help="train_step (in-memory data)")
    parser.add_argument("--jpeg-size", default=None, help="JPEG files' size, W or WxH (default: image size)")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-cudnn-benchmark", action="store_true")
    parser.add_argument("--no-tf32", action="store_true")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary folder (JPEGs, checkpoints)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.backbone is None:
        args.backbone = "resnet18" if args.quick else "resnet50"
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    report: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        report["error"] = str(error)
        print(json.dumps(report, indent=2))
        return report
    report["config"]["device"] = str(device)
    cuda = device.type == "cuda"
    with temp_folder(args.tmp_dir) as folder:
        jpegs = folder / "jpegs"

        def with_jpegs(fn):
            def run() -> dict[str, Any]:
                if not (jpegs / ".done").exists():
                    size = parse_size(args.jpeg_size or str(args.image_size))
                    report["jpegs"] = write_jpeg_folder(jpegs, args.loader_images, size=size)
                    (jpegs / ".done").touch()
                return fn()

            return run

        sections = {
            "environment": lambda: environment(device),
            "train_step": lambda: train_step(args, device, folder),
            "loader": with_jpegs(lambda: loader(args, device, folder, jpegs)),
            "decode": with_jpegs(lambda: decode(args, device, jpegs)),
            "faiss_kmeans": lambda: faiss_kmeans(args),
            "faiss_knn": lambda: faiss_knn(args),
        }
        for name in SECTIONS:
            if name not in args.sections:
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            run_section(name, sections[name], report, log=log)
            if cuda and isinstance(report[name], dict):
                report[name]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report = round_floats(report)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
