"""``dcml embed`` throughput over JPEG files vs a bare torch loop over the same decoded images.

Writes ``--images`` JPEG files (smooth colour fields with mild noise, ``--jpeg-size``,
default 256x256) into a temporary class folder, and a seeded, untrained checkpoint made
like the tests make theirs: the repository's ``params.yaml`` shrunk (``--backbone``,
``--image-size``, ``--embedding-dim``, ``eval.batch_size`` = ``--batch-size``),
``Trainer.create(...).save(path)``. Then, in ``--repeats`` interleaved rounds (medians
reported), images/s of

- ``dcml``: :func:`dcml.retrieval.embedding.embed_listing` (what ``dcml embed`` runs) over
  :func:`dcml.retrieval.images.list_images` of the folder, into a fresh output folder,
  once per ``--num-workers`` setting (default ``auto`` and ``0``). The clock covers the
  whole call: reading, hashing and decoding the files, the eval transform, the forward
  pass, Parquet shards, digest and ``info.json``;
- ``bare``: the same model (``load_model(...).embedder``), the same eval transform and
  batch size over PIL images already decoded in memory: transform, stack, forward,
  result to the host. Nothing else;
- ``bare_from_files``: the bare loop reading and decoding each file itself (one
  thread), i.e. what a minimal script over the same files does;
- ``forward_only``: the forward pass alone on transformed batches already on the device.

``ratio_dcml_to_bare`` (goal >= 0.9) and ``ratio_dcml_to_bare_from_files`` per worker
setting. ``breakdown``: one more, untimed-for-ratio run of ``embed_listing`` per worker
setting, instrumented (the DataLoader's waits and the forward pass, with device syncs),
so ``loader_wait_s`` vs ``forward_s`` tells whether loading is the bottleneck; on CUDA
``loader_bound`` says so directly. ``cli``: one ``python -m flows.cli embed`` run end to
end (process start, imports, model load included).

    .venv/bin/python bench/bench_embed.py                          # 2,000 JPEGs, small_cnn at 64 px
    .venv/bin/python bench/bench_embed.py --backbone resnet18      # 224 px
    .venv/bin/python bench/bench_embed.py --quick                  # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import environment, log  # noqa: E402
from common import parse_size, parse_workers, round_floats, sync, temp_folder, write_jpeg_folder  # noqa: E402

from dcml.config import load_params  # noqa: E402
from dcml.data.folder import to_rgb  # noqa: E402
from dcml.device import resolve_device, resolve_num_workers  # noqa: E402
from dcml.inference import LoadedModel, load_model  # noqa: E402
from dcml.retrieval import embedding as embedding_module  # noqa: E402
from dcml.retrieval.embedding import embed_listing  # noqa: E402
from dcml.retrieval.images import Listing, list_images  # noqa: E402
from dcml.trainer import Trainer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE_SIZE = {"small_cnn": 64, "resnet18": 224, "resnet34": 224, "resnet50": 224}


# ---------------------------------------------------------------------------- shared with bench_index/bench_serve


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """``bench_gpu.environment`` (versions, CPUs, GPU, faiss build), the CPU model and the
    load average when it was called (other processes slow every number down)."""
    return {**environment(device), "cpu_model": cpu_model(), "load_average_1_5_15": list(os.getloadavg())}


def make_checkpoint(
    path: Path, *, backbone: str = "small_cnn", image_size: int = 64, embedding_dim: int = 64, batch_size: int = 256
) -> Path:
    """A seeded, untrained checkpoint of the repository's ``params.yaml``, shrunk as the
    tests do (``tests/test_retrieval.py::_checkpoint``): ``Trainer.create(...).save(path)``."""
    params = load_params(REPO_ROOT / "params.yaml")
    r = dataclasses.replace
    params = r(
        params,
        data=r(params.data, image_size=image_size, resize_size=max(image_size, round(image_size * 256 / 224))),
        model=r(params.model, backbone=backbone, pretrained="none", freeze_bn=False, embedding_dim=embedding_dim),
        train=r(params.train, device="cpu"),
        eval=r(params.eval, batch_size=batch_size),
    )
    trainer = Trainer.create(params, 10, torch.device("cpu"), load_pretrained=False)
    return trainer.save(path)


# ---------------------------------------------------------------------------- the loops


def decode_file(path: str) -> Image.Image:
    """As ``HashedImageDataset`` decodes: bytes -> PIL -> RGB."""
    with Image.open(io.BytesIO(Path(path).read_bytes())) as decoded:
        decoded.load()
        return to_rgb(decoded)


def dcml_run(model: LoadedModel, listing: Listing, out: Path, device: torch.device, workers: int) -> float:
    """Seconds of one ``embed_listing`` call into the fresh folder ``out`` (deleted after)."""
    sync(device)
    start = time.perf_counter()
    info = embed_listing(model, listing, out, device=device, num_workers=workers)
    sync(device)
    seconds = time.perf_counter() - start
    if info["count"] != len(listing):
        raise RuntimeError(f"embed_listing embedded {info['count']} of {len(listing)} images")
    shutil.rmtree(out)
    return seconds


def _memory_format(model: LoadedModel) -> torch.memory_format:
    return torch.channels_last if model.params.train.channels_last else torch.contiguous_format


@torch.no_grad()
def bare_run(model: LoadedModel, images: list, device: torch.device, *, from_files: bool = False) -> float:
    """Seconds of the bare loop: (decode,) transform, stack, forward, result to the host."""
    embedder = model.embedder.to(device).eval()
    memory_format = _memory_format(model)
    batch_size = model.batch_size
    sync(device)
    start = time.perf_counter()
    for first in range(0, len(images), batch_size):
        chunk = images[first : first + batch_size]
        if from_files:
            chunk = [decode_file(path) for path in chunk]
        batch = torch.stack([model.transform(image) for image in chunk])
        embedder(batch.to(device, non_blocking=True, memory_format=memory_format)).float().cpu()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def forward_only_run(model: LoadedModel, batches: list[torch.Tensor], device: torch.device) -> float:
    embedder = model.embedder.to(device).eval()
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        embedder(batch)
    sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- instrumented run


class _Timings:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.forwards: list[float] = []


def _timed_loader_class(timings: _Timings):
    base = embedding_module.DataLoader

    class TimedLoader(base):
        """The DataLoader ``_embed_shard`` builds, recording how long each batch is waited for."""

        def __iter__(self) -> Iterator:
            iterator = super().__iter__()
            while True:
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                timings.waits.append(time.perf_counter() - start)
                yield batch

    return TimedLoader


def breakdown_run(checkpoint: Path, listing: Listing, out: Path, device: torch.device, workers: int) -> dict:
    """One instrumented ``embed_listing`` call: batch waits (DataLoader) and forward passes
    (synchronised) recorded; the rest is copies, the Parquet shard, digest and info.json."""
    model = load_model(checkpoint, device)
    timings = _Timings()
    inner = model.embedder.forward

    def timed_forward(images: torch.Tensor) -> torch.Tensor:
        sync(device)
        start = time.perf_counter()
        result = inner(images)
        sync(device)
        timings.forwards.append(time.perf_counter() - start)
        return result

    model.embedder.forward = timed_forward
    original = embedding_module.DataLoader
    embedding_module.DataLoader = _timed_loader_class(timings)
    try:
        seconds = dcml_run(model, listing, out, device, workers)
    finally:
        embedding_module.DataLoader = original
    wait, forward = sum(timings.waits), sum(timings.forwards)
    result = {
        "num_workers": workers,
        "total_s": seconds,
        "images_per_s": len(listing) / seconds,
        "batches": len(timings.waits),
        "loader_wait_s": wait,
        "loader_first_batch_s": timings.waits[0] if timings.waits else None,
        "forward_s": forward,
        "other_s": seconds - wait - forward,
        "loader_wait_share": wait / seconds,
        "forward_share": forward / seconds,
    }
    if device.type == "cuda":
        result["loader_bound"] = wait > forward
    return result


# ---------------------------------------------------------------------------- CLI run


def cli_run(checkpoint: Path, root: Path, out: Path, device: torch.device, workers: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "flows.cli", "embed", str(checkpoint), str(root), "--out", str(out)]
    command += ["--num-workers", workers, "--device", device.type]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-1500:]}
    count = json.loads(done.stdout)["count"]
    shutil.rmtree(out)
    return {"num_workers": workers, "wall_s": seconds, "images": count, "images_per_s_with_startup": count / seconds}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn", choices=sorted(DEFAULT_IMAGE_SIZE))
    parser.add_argument(
        "--image-size", type=int, default=None, help="network input (default: 64 small_cnn, 224 ResNets)"
    )
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="eval.batch_size (default: params.yaml's)")
    parser.add_argument("--images", type=int, default=2000, help="JPEG files to embed (plus 2 of a test class)")
    parser.add_argument("--jpeg-size", default="256", help="W or WxH of the files (default 256)")
    parser.add_argument("--num-workers", type=parse_workers, nargs="+", default=["auto", 0], help="N or auto, each")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-cli", action="store_true", help="skip the `python -m flows.cli embed` run")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented runs")
    parser.add_argument("--quick", action="store_true", help="smoke test: 160 images, 1 round")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = min(args.images, 160), 1
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.backbone]
    args.batch_size = args.batch_size or load_params(REPO_ROOT / "params.yaml").eval.batch_size
    device = resolve_device(args.device)
    report: dict[str, Any] = {"config": {**vars(args), "device": str(device)}, "machine": machine(device)}
    started = time.perf_counter()
    with temp_folder(args.tmp_dir) as folder:
        root = folder / "jpegs"
        log(f"[bench_embed] writing {args.images} JPEGs ...")
        report["dataset"] = write_jpeg_folder(root, args.images, size=parse_size(args.jpeg_size))
        checkpoint = make_checkpoint(
            folder / "model.pt",
            backbone=args.backbone,
            image_size=args.image_size,
            embedding_dim=args.embedding_dim,
            batch_size=args.batch_size,
        )
        start = time.perf_counter()
        model = load_model(checkpoint, device)
        report["load_model_s"] = time.perf_counter() - start
        listing = list_images(root)
        n = len(listing)
        start = time.perf_counter()
        decoded = [decode_file(path) for path in listing.paths]
        report["decode_in_memory_s"] = time.perf_counter() - start
        memory_format = _memory_format(model)
        batches = [
            torch.stack([model.transform(image) for image in decoded[i : i + model.batch_size]]).to(
                device, memory_format=memory_format
            )
            for i in range(0, n, model.batch_size)
        ]
        workers = {str(w): resolve_num_workers(w, device) for w in args.num_workers}
        runs: dict[str, list[float]] = {f"dcml_workers_{w}": [] for w in workers}
        runs |= {"bare": [], "bare_from_files": [], "forward_only": []}
        # warm-up (untimed): one bare pass and one forward pass
        bare_run(model, decoded[: model.batch_size], device)
        loops = {
            **{
                f"dcml_workers_{name}": (
                    lambda r, name=name, w=w: dcml_run(model, listing, folder / f"emb-{name}-{r}", device, w)
                )
                for name, w in workers.items()
            },
            "bare": lambda r: bare_run(model, decoded, device),
            "bare_from_files": lambda r: bare_run(model, list(listing.paths), device, from_files=True),
            "forward_only": lambda r: forward_only_run(model, batches, device),
        }
        order = list(loops)
        for r in range(args.repeats):
            log(f"[bench_embed] round {r + 1}/{args.repeats}")
            for name in order[r % len(order) :] + order[: r % len(order)]:  # rotated: no loop always runs first
                runs[name].append(n / loops[name](r))
        medians = {key: float(np.median(values)) for key, values in runs.items()}
        report["images"] = n
        report["num_workers_resolved"] = workers
        report["bare_images_per_s"] = medians["bare"]
        report["bare_from_files_images_per_s"] = medians["bare_from_files"]
        report["forward_only_images_per_s"] = medians["forward_only"]
        report["dcml"] = {
            name: {
                "num_workers": resolved,
                "images_per_s": medians[f"dcml_workers_{name}"],
                "ratio_dcml_to_bare": medians[f"dcml_workers_{name}"] / medians["bare"],
                "ratio_dcml_to_bare_from_files": medians[f"dcml_workers_{name}"] / medians["bare_from_files"],
            }
            for name, resolved in workers.items()
        }
        if args.repeats > 1:
            report["runs_images_per_s"] = runs
        if not args.no_breakdown:
            log("[bench_embed] instrumented runs ...")
            report["breakdown"] = {
                name: breakdown_run(checkpoint, listing, folder / f"emb-breakdown-{name}", device, resolved)
                for name, resolved in workers.items()
            }
        if not args.no_cli:
            log("[bench_embed] CLI run ...")
            report["cli"] = cli_run(checkpoint, root, folder / "emb-cli", device, str(args.num_workers[0]))
    return finish(report, started)


def finish(report: dict, started: float) -> dict:
    """Total time and load at the end, rounded, printed as JSON (every retrieval bench ends so)."""
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = list(os.getloadavg())
    report = round_floats(report)
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
