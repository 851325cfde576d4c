"""faiss index folders: ``dcml index eval`` and ``Searcher.search`` vs bare faiss, and build cost at 1M.

Data: seeded random unit vectors (float32, uniform on the sphere) with labels in classes
of ``--images-per-class`` (10). Uniform vectors have no cluster structure, the worst case
for IVF and HNSW: their neighbour recall here is a lower bound of what real embeddings
give. ``--spread S`` instead draws each class around a random centre (noise of norm S,
e.g. 1.0), which is closer to trained embeddings. Timings of dcml and bare faiss are
taken in interleaved rounds (``--repeats``, medians), so load from other processes hits
both alike.

Sections (each prints its fields into one JSON object):

- ``flat``: ``--n`` (100k) x ``--dim`` (128), wrapped in an ``EmbeddingSet`` and written
  with :func:`dcml.retrieval.index.build_index_folder` (``Flat``), loaded with
  ``load_index_folder``. ``eval``: :func:`dcml.retrieval.evaluate.evaluate_index` (what
  ``dcml index eval`` runs) with the first ``--eval-queries`` (10k) indexed rows as the
  query set (each excludes itself by SHA-256; 0 = all n, the same set), queries/s, vs bare
  ``faiss.IndexFlatIP.search`` of the same vectors at the depth evaluate_index asks for.
  ``search``: ``Searcher.search`` vs bare ``IndexFlatIP.search`` (same normalised arrays,
  same k), one call with ``--search-queries`` (10k) queries and ``--single-queries``
  (200) calls of one query; ratios (goal >= 0.95).
- ``approximate``: each of ``--approximate`` (``HNSW32,Flat``, ``IVF1024,Flat``) over
  the same n vectors: build seconds, and per ``--ef-search`` / ``--nprobe`` value
  ``Searcher.search`` queries/s and neighbour recall@k vs the exact search.
- ``large``: ``--large-n`` (1M) x ``--dim`` in fresh subprocesses (so each
  ``peak_rss_mib`` is its own): ``Flat`` and ``--ivf`` (``IVF4096,Flat``, trained on
  all vectors: faiss samples at most 256 x nlist) built with ``build_index_folder``:
  build seconds, RSS before and peak, index file size, ``load_index_folder`` seconds,
  ``Searcher.search`` queries/s on ``--large-queries`` (10k) fresh queries (Flat: also
  vs bare faiss on ``--large-compare-queries``). IVF: per ``--nprobe`` (the first is
  faiss's default, 1) queries/s and neighbour recall@k vs the exact Flat result.

dcml has no nprobe/efSearch setting: the bench sets them on the loaded faiss index.

    .venv/bin/python bench/bench_index.py                     # the real measurement (~10 min on 2 cores)
    .venv/bin/python bench/bench_index.py --quick             # smoke test, < 1 min
    .venv/bin/python bench/bench_index.py --skip-large --spread 1.0   # 100k sections, clustered data
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
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import machine  # noqa: E402
from bench_gpu import log  # noqa: E402
from common import round_floats, temp_folder  # noqa: E402

from dcml.retrieval.evaluate import evaluate_index  # noqa: E402
from dcml.retrieval.index import build_index_folder, load_index_folder  # noqa: E402
from dcml.retrieval.search import Searcher  # noqa: E402
from dcml.retrieval.store import EmbeddingSet, digest  # noqa: E402

MODEL = {"sha256": "bench-random-vectors", "checkpoint": "none", "recall_ks": [1, 2, 4, 8]}
QUICK = {
    "n": 5000,
    "eval_queries": 1000,
    "search_queries": 500,
    "single_queries": 100,
    "large_n": 20_000,
    "large_queries": 500,
    "large_compare_queries": 200,
    "ivf": "IVF64,Flat",
    "approximate": ["HNSW32,Flat", "IVF32,Flat"],
    "nprobe": [1, 4, 16],
    "ef_search": [16, 64],
    "repeats": 1,
}


# ---------------------------------------------------------------------------- data


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` seeded random unit vectors (float32), generated in blocks."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        block = out[start : start + (1 << 16)]
        rng.standard_normal(block.shape, dtype=np.float32, out=block)
    faiss.normalize_L2(out)
    return out


def data_vectors(args, n: int, *, queries: int = 0) -> np.ndarray:
    """The benchmark's vectors (``--seed``): uniform unit vectors, or with ``--spread`` > 0
    class centres (uniform) plus Gaussian noise of norm about ``spread``, normalised; row
    ``i`` belongs to class ``i // --images-per-class``. ``queries`` > 0: that many fresh
    vectors around the same centres (random classes) instead."""
    seed = args.seed + (1 if queries else 0)
    if args.spread <= 0:
        return unit_vectors(queries or n, args.dim, seed)
    centres = unit_vectors(-(-n // args.images_per_class), args.dim, args.seed + 2)
    rng = np.random.default_rng(seed + 3)
    labels = rng.integers(0, len(centres), queries) if queries else np.arange(n) // args.images_per_class
    out = unit_vectors(len(labels), args.dim, seed)  # unit noise directions
    out *= args.spread
    out += centres[labels]
    faiss.normalize_L2(out)
    return out


def embedding_set(vectors: np.ndarray, images_per_class: int, rows: slice | None = None) -> EmbeddingSet:
    """An ``EmbeddingSet`` as ``dcml embed`` would have written it (rows ``rows`` of it)."""
    ids = np.arange(len(vectors), dtype=np.int64)[rows or slice(None)]
    vectors = vectors[rows or slice(None)]
    info = {
        "format": "dcml-embeddings/1",
        "count": len(ids),
        "dimension": vectors.shape[1],
        "digest": digest(ids, vectors),
        "labels": True,
        "model": MODEL,
        "learners": [{"kind": "slice", "start": 0, "stop": vectors.shape[1]}],
        "folder": "",
    }
    return EmbeddingSet(
        ids=ids,
        paths=[f"images/{i:07d}.jpg" for i in ids],
        labels=[f"c{i // images_per_class:06d}" for i in ids],
        sha256=[f"{i:064x}" for i in ids],
        embeddings=vectors,
        info=info,
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def timed(fn, repeats: int = 1) -> tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last result)."""
    seconds, results = interleaved({"fn": fn}, repeats)
    return seconds["fn"], results["fn"]


def interleaved(fns: dict[str, Any], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function over ``repeats`` rounds that call every one in turn
    (so load from other processes hits all alike), and each one's last result."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}, results


def neighbour_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |found top k ∩ exact top k| / k."""
    hits = [len(np.intersect1d(f[:k], e[:k])) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / k


def positions_of(hits: list[list[dict[str, Any]]], k: int) -> np.ndarray:
    """``Searcher.search`` hits -> (n, k) ids (= positions here; -1 where fewer)."""
    out = np.full((len(hits), k), -1, dtype=np.int64)
    for row, row_hits in enumerate(hits):
        ids = [hit["id"] for hit in row_hits]
        out[row, : len(ids)] = ids
    return out


# ---------------------------------------------------------------------------- 100k sections


def flat_section(args, vectors: np.ndarray, folder: Path) -> dict[str, Any]:
    embeddings = embedding_set(vectors, args.images_per_class)
    build_s, _ = timed(lambda: build_index_folder(embeddings, folder / "flat", "Flat", use_gpu=False))
    load_s, index = timed(lambda: load_index_folder(folder / "flat"))
    out: dict[str, Any] = {"n": len(vectors), "dim": vectors.shape[1], "build_s": build_s, "load_s": load_s}
    bare = faiss.IndexFlatIP(vectors.shape[1])
    bare.add(vectors)

    # dcml index eval (evaluate_index) vs bare faiss at the depth it asks for
    m = args.eval_queries or len(vectors)
    queries = embeddings if m >= len(vectors) else embedding_set(vectors, args.images_per_class, slice(0, m))
    ks = sorted(set(args.eval_ks))
    depth = max(ks[-1], args.images_per_class - 1) + 1  # + the excluded self
    seconds, results = interleaved(
        {"dcml": lambda: evaluate_index(index, queries, ks), "bare": lambda: bare.search(queries.embeddings, depth)},
        args.repeats,
    )
    eval_s, bare_s, metrics = seconds["dcml"], seconds["bare"], results["dcml"]
    out["eval"] = {
        "queries": m,
        "same_set": metrics["same_set"],
        "ks": ks,
        "seconds": eval_s,
        "queries_per_s": m / eval_s,
        "bare_search_k": depth,
        "bare_search_s": bare_s,
        "bare_queries_per_s": m / bare_s,
        "ratio_dcml_to_bare": bare_s / eval_s,
        "metrics": {key: value for key, value in metrics.items() if "@" in key or "map" in key.lower()},
    }

    # Searcher.search vs bare faiss, same arrays and k
    searcher = Searcher(index)
    q = vectors[: args.search_queries]
    k = args.k
    singles = vectors[: args.single_queries]
    seconds, results = interleaved(
        {
            "dcml": lambda: searcher.search(q, k),
            "bare": lambda: bare.search(q, k),
            "dcml_single": lambda: [searcher.search(v[None, :], k) for v in singles],
            "bare_single": lambda: [bare.search(v[None, :], k) for v in singles],
        },
        args.repeats,
    )
    search_s, bare_s, single_s, bare_single_s = (seconds[key] for key in ("dcml", "bare", "dcml_single", "bare_single"))
    bare_positions = results["bare"][1]
    same = bool(np.array_equal(positions_of(results["dcml"], k), bare_positions))
    out["search"] = {
        "k": k,
        "batch_queries": len(q),
        "queries_per_s": len(q) / search_s,
        "bare_queries_per_s": len(q) / bare_s,
        "ratio_dcml_to_bare": bare_s / search_s,
        "same_neighbours_as_bare": same,
        "single_queries": len(singles),
        "single_query_ms": 1000 * single_s / len(singles),
        "bare_single_query_ms": 1000 * bare_single_s / len(singles),
        "single_ratio_dcml_to_bare": bare_single_s / single_s,
    }
    out["_exact"] = bare_positions
    return out


def approximate_section(args, factory: str, vectors: np.ndarray, exact: np.ndarray, folder: Path) -> dict:
    """An approximate index over the same vectors: build seconds, and per search setting
    (HNSW ``efSearch``, IVF ``nprobe``; set on the loaded faiss index, dcml has no option)
    Searcher.search queries/s and neighbour recall@k vs the exact search."""
    embeddings = embedding_set(vectors, args.images_per_class)
    build_s, _ = timed(lambda: build_index_folder(embeddings, folder / "approx", factory, use_gpu=False))
    index = load_index_folder(folder / "approx")
    searcher = Searcher(index)
    q, k = vectors[: args.search_queries], args.k
    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        name, values, default = "nprobe", args.nprobe, int(ivf.nprobe)
    else:
        hnsw = faiss.downcast_index(index.index).hnsw
        name, values, default = "efSearch", args.ef_search, int(hnsw.efSearch)
    out: dict[str, Any] = {
        "factory": factory,
        "build_s": build_s,
        "k": k,
        "queries": len(q),
        f"default_{name}": default,
    }
    out[name] = {}
    for value in values:
        if ivf is not None:
            ivf.nprobe = value
        else:
            hnsw.efSearch = value
        seconds, hits = timed(lambda: searcher.search(q, k), args.repeats)
        out[name][str(value)] = {
            "queries_per_s": len(q) / seconds,
            f"neighbor_recall@{k}": neighbour_recall(positions_of(hits, k), exact, k),
        }
    return out


# ---------------------------------------------------------------------------- 1M children


def child(args) -> None:
    """One large build in this (fresh) process; prints its JSON."""
    folder = Path(args.child_folder)
    start = time.perf_counter()
    vectors = data_vectors(args, args.large_n)
    embeddings = embedding_set(vectors, args.images_per_class)
    queries = data_vectors(args, args.large_n, queries=args.large_queries)
    out: dict[str, Any] = {"factory": args.child, "n": args.large_n, "dim": args.dim}
    out["data_s"] = time.perf_counter() - start
    out["rss_before_build_mib"] = rss_mib()
    out["peak_rss_before_build_mib"] = peak_rss_mib()
    target = folder / ("flat" if args.child == "Flat" else "ivf")
    start = time.perf_counter()
    build_index_folder(embeddings, target, args.child, use_gpu=False)
    out["build_s"] = time.perf_counter() - start
    out["peak_rss_mib"] = peak_rss_mib()
    out["peak_rss_increase_mib"] = out["peak_rss_mib"] - out["rss_before_build_mib"]
    out["index_file_mib"] = (target / "index.faiss").stat().st_size / 2**20
    del embeddings
    out["load_s"], index = timed(lambda: load_index_folder(target))
    searcher, k = Searcher(index), args.k
    if args.child == "Flat":
        seconds, hits = timed(lambda: searcher.search(queries, k))
        exact = positions_of(hits, k)
        np.save(folder / "exact.npy", exact)
        few = queries[: args.large_compare_queries]
        times, results = interleaved(
            {"dcml": lambda: searcher.search(few, k), "bare": lambda: index.index.search(few, k)}, 2
        )
        out |= {
            "k": k,
            "queries": len(queries),
            "queries_per_s": len(queries) / seconds,
            "compare_queries": len(few),
            "compare_queries_per_s": len(few) / times["dcml"],
            "compare_bare_queries_per_s": len(few) / times["bare"],
            "ratio_dcml_to_bare": times["bare"] / times["dcml"],
            "same_neighbours_as_bare": bool(np.array_equal(exact[: len(few)], results["bare"][1])),
        }
    else:
        exact = np.load(folder / "exact.npy")
        ivf = faiss.extract_index_ivf(index.index)
        out |= {"nlist": int(ivf.nlist), "default_nprobe": int(ivf.nprobe), "k": k, "queries": len(queries)}
        out["nprobe"] = {}
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            seconds, hits = timed(lambda: searcher.search(queries, k))
            out["nprobe"][str(nprobe)] = {
                "queries_per_s": len(queries) / seconds,
                f"neighbor_recall@{k}": neighbour_recall(positions_of(hits, k), exact, k),
            }
    out["faiss_threads"] = faiss.omp_get_max_threads()
    print(json.dumps(out))


def run_child(args, factory: str, folder: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", factory, "--child-folder", str(folder)]
    for name in ("large_n", "large_queries", "large_compare_queries", "dim", "k", "seed", "images_per_class", "spread"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--nprobe", *map(str, args.nprobe)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}", "stderr_tail": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="vectors of the flat/HNSW sections")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--images-per-class", type=int, default=10, help="labels: classes of this many vectors")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="0: uniform unit vectors (default); > 0: classes around random centres, noise of this norm",
    )
    parser.add_argument("--k", type=int, default=10, help="neighbours per search query")
    parser.add_argument(
        "--eval-queries",
        type=int,
        default=10_000,
        help="index eval queries, the first rows (0 or >= n: all, the same set)",
    )
    parser.add_argument("--eval-ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--search-queries", type=int, default=10_000, help="queries in one Searcher.search call")
    parser.add_argument("--single-queries", type=int, default=200, help="calls of one query each")
    parser.add_argument(
        "--approximate",
        nargs="*",
        default=["HNSW32,Flat", "IVF1024,Flat"],
        help="approximate factories built over the n vectors (none: no arguments)",
    )
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--large-n", type=int, default=1_000_000)
    parser.add_argument("--large-queries", type=int, default=10_000, help="queries of the 1M search and recall")
    parser.add_argument(
        "--large-compare-queries", type=int, default=1000, help="1M Flat: queries of Searcher vs bare faiss (2 rounds)"
    )
    parser.add_argument("--ivf", default="IVF4096,Flat", help="factory of the approximate 1M index")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 16, 64, 256], help="first: faiss's default (1)")
    parser.add_argument("--skip-large", action="store_true", help="no 1M builds")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (100k); median")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes")
    parser.add_argument("--tmp-dir", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    started = time.perf_counter()
    config = {key: value for key, value in vars(args).items() if not key.startswith("child")}
    report: dict[str, Any] = {"config": config, "machine": machine(torch.device("cpu"))}
    report["machine"]["faiss_threads"] = faiss.omp_get_max_threads()
    with temp_folder(args.tmp_dir) as folder:
        vectors = data_vectors(args, args.n)
        log(f"[bench_index] flat {args.n} x {args.dim} ...")
        report["flat"] = flat_section(args, vectors, folder)
        exact = report["flat"].pop("_exact")
        report["approximate"] = {}
        for factory in args.approximate:
            log(f"[bench_index] {factory} on {args.n} x {args.dim} ...")
            report["approximate"][factory] = approximate_section(args, factory, vectors, exact, folder)
        del vectors
        if not args.skip_large:
            report["large"] = {}
            for factory in ("Flat", args.ivf):
                log(f"[bench_index] {factory} on {args.large_n} x {args.dim} (subprocess) ...")
                report["large"][factory] = run_child(args, factory, folder)
                if "error" in report["large"][factory]:
                    break
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = list(os.getloadavg())
    report = round_floats(report, 4)
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    os.environ.setdefault("KMP_WARNINGS", "0")
    main()
