"""Time and peak memory of dcml.metrics.evaluate_retrieval at SOP test scale.

Synthetic Stanford-Online-Products-like data: 60,502 L2-normalised embeddings in
11,316 classes (2-12 images each, mean ~5.3), class centre + noise. Each configuration
runs in a fresh subprocess so that the reported peak RSS (``ru_maxrss``) is its own.

    .venv/bin/python bench/bench_metrics.py                  # 128-d and 2048-d, kNN metrics
    .venv/bin/python bench/bench_metrics.py --dims 128 --nmi # also time NMI (k-means, 11k clusters)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SOP_TEST_IMAGES = 60_502
SOP_TEST_CLASSES = 11_316
SOP_KS = (1, 10, 100, 1000)
REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_embeddings(n: int, num_classes: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors and (n,) int64 labels, every class with >= 2 images.

    Class centre + isotropic noise; the centre scale shrinks like dim**-1/4 so that the
    task stays comparably hard (R@1 well below 1) at 128 and 2048 dimensions. Built in
    blocks so that generation does not dominate the peak memory.
    """
    rng = np.random.default_rng(seed)
    extra = rng.integers(0, num_classes, n - 2 * num_classes)
    labels = np.sort(np.concatenate([np.arange(num_classes), np.arange(num_classes), extra]))
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32) * (0.6 * (128 / dim) ** 0.25)
    embeddings = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 4096):
        block = rng.standard_normal((min(4096, n - start), dim), dtype=np.float32)
        block += centres[labels[start : start + 4096]]
        embeddings[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return embeddings, labels


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_once(dim: int, n: int, num_classes: int, with_nmi: bool, chunk_size: int) -> dict[str, object]:
    """Run evaluate_retrieval once in this process; return timings, peak RSS and metrics."""
    from dcml import metrics

    embeddings, labels = synthetic_embeddings(n, num_classes, dim)
    rss_data = peak_rss_mib()
    start = time.perf_counter()
    result = metrics.evaluate_retrieval(embeddings, labels, SOP_KS, with_nmi=False, chunk_size=chunk_size)
    knn_seconds = time.perf_counter() - start
    rss_knn = peak_rss_mib()
    report = {"dim": dim, "n": n, "classes": num_classes, "knn_metrics_s": round(knn_seconds, 1)}
    report |= {"peak_rss_data_mib": round(rss_data), "peak_rss_after_knn_mib": round(rss_knn)}
    if with_nmi:
        start = time.perf_counter()
        result["nmi"] = metrics.nmi(embeddings, labels)
        report["nmi_s"] = round(time.perf_counter() - start, 1)
        report["peak_rss_after_nmi_mib"] = round(peak_rss_mib())
    report["metrics"] = {key: round(value, 4) for key, value in result.items()}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--n", type=int, default=SOP_TEST_IMAGES)
    parser.add_argument("--classes", type=int, default=SOP_TEST_CLASSES)
    parser.add_argument("--nmi", action="store_true", help="also time NMI (k-means with #classes clusters)")
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(bench_once(args.dims[0], args.n, args.classes, args.nmi, args.chunk_size)))
        return
    for dim in args.dims:
        command = [sys.executable, __file__, "--single", "--dims", str(dim), "--n", str(args.n)]
        command += ["--classes", str(args.classes), "--chunk-size", str(args.chunk_size)]
        command += ["--nmi"] if args.nmi else []
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
        print(output.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
