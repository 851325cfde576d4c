"""``dcml embed``, ``dcml index build|eval``, ``dcml search``, ``dcml serve``: use a trained model.

Thin: each calls one task of :mod:`tasks.retrieval` as a plain function (no Prefect
server for a one-off command) or :mod:`dcml.retrieval` directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _embed(args: argparse.Namespace) -> None:
    from dcml.retrieval import store
    from tasks.retrieval import embed_images

    if args.fresh and Path(args.out).is_dir():
        shutil.rmtree(args.out)
    out = embed_images.fn(
        args.model, args.out, args.images, args.split, args.device, args.num_workers, args.shard_size, args.params
    )
    info = store.read_info(out)
    keys = ("count", "num_listed", "num_unreadable", "dimension", "num_shards", "digest", "labels")
    summary = {"out": out, **{key: info[key] for key in keys}, "model": info["model"]["source"]}
    if info["num_unreadable"]:
        summary["unreadable"] = str(Path(out) / store.UNREADABLE)
        print(
            f"dcml: {info['num_unreadable']} unreadable image(s) skipped, see {summary['unreadable']}", file=sys.stderr
        )
    print(json.dumps(summary, indent=2))


def _index_build(args: argparse.Namespace) -> None:
    from dcml.retrieval import store
    from tasks.retrieval import build_index

    out = build_index.fn(args.embeddings, args.out, args.factory, args.device, args.search_params)
    info = store.read_info(out, "index folder")
    print(json.dumps({"out": out, **{k: info[k] for k in ("factory", "metric", "count", "dimension", "built_on")}}))


def _index_eval(args: argparse.Namespace) -> None:
    from tasks.retrieval import evaluate_index

    result = evaluate_index.fn(
        args.index, args.queries, args.k, args.out, not args.no_mlflow, args.params, args.search_params
    )
    print(json.dumps(result, indent=2, sort_keys=True))


def _search(args: argparse.Namespace) -> None:
    searcher = searcher_for(args.index, args.device, bool(args.image), args.params, args.search_params)
    if args.image:
        names = list(args.image)
        vectors = searcher.embed_images(names)
    else:
        names, vectors = _embeddings_file(args.embedding)
    for name, hits in zip(names, searcher.search(vectors, args.k, args.learner), strict=True):
        for hit in hits:
            print(json.dumps({"query": name, **hit}))


def _embeddings_file(path: str) -> tuple[list[str], object]:
    """Query embeddings from a ``.npy`` file ((d,) or (n, d)) or a ``dcml embed`` folder."""
    import numpy as np

    from dcml.retrieval import RetrievalError, store

    file = Path(path)
    if file.is_dir():
        queries = store.read_embeddings(file)
        return list(queries.paths), queries.embeddings
    if not file.is_file():
        raise RetrievalError(f"embedding file not found: {path}")
    try:
        vectors = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise RetrievalError(f"cannot read {path} as a .npy array: {error}") from None
    vectors = np.atleast_2d(vectors)
    return [f"{path}[{i}]" for i in range(len(vectors))], vectors


def searcher_for(index_path: str, device: str, with_model: bool, params_path: str, search_parameters=None):
    from dcml.device import resolve_device
    from dcml.inference import load_model
    from dcml.retrieval.index import load_index_folder
    from dcml.retrieval.search import Searcher

    index = load_index_folder(index_path, search_parameters)
    torch_device = resolve_device(device)
    model = load_model(index_model(index.info, params_path), torch_device) if with_model else None
    return Searcher(index, model, torch_device)


def index_model(info: dict, params_path: str) -> Path:
    """The checkpoint of an index's model: the recorded file when it is still the same
    (SHA-256), else resolved again from where it came from (e.g. the MLflow URI)."""
    from dcml.inference import file_digest
    from dcml.retrieval import RetrievalError
    from tasks.models import resolve_model

    model = info["model"]
    for recorded in (model["checkpoint"], model.get("checkpoint_absolute")):
        if recorded and Path(recorded).is_file() and file_digest(recorded) == model["sha256"]:
            return Path(recorded)
    for spec in (model.get("mlflow_model_uri"), model.get("source")):
        if spec:
            try:
                candidate = resolve_model(spec, params_path).checkpoint
            except RetrievalError:
                continue
            if file_digest(candidate) == model["sha256"]:
                return candidate
    raise RetrievalError(
        f"the index's model {model['checkpoint']} (sha256 {model['sha256'][:12]}) is gone or changed; "
        "embed the queries yourself and use --embedding"
    )


def _serve(args: argparse.Namespace) -> None:
    from flows.serve import serve

    serve(args.index, args.host, args.port, args.device, args.params, args.search_params)


def _search_params_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--search-params", metavar="P", help="faiss search parameters instead of the index's, e.g. nprobe=64"
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    devices = ["auto", "cpu", "cuda"]
    embed = commands.add_parser(
        "embed",
        help="embed images with a trained model: Parquet shards + info.json (resumable)",
        description="Apply a model's evaluation transform and test embedding to images. Output: DIR/shards/"
        "part-NNNNN.parquet (id, path, label, sha256, embedding float32), DIR/info.json (model, dimension, "
        "learner sub-spaces, transform), DIR/unreadable.txt. A rerun continues where it stopped.",
    )
    embed.add_argument(
        "model",
        metavar="MODEL",
        help="a checkpoint (.pt), a run folder, a sweep's best.json (outputs/best.json), or an MLflow model URI "
        "(models:/<name>@best, runs:/<run id>/model)",
    )
    embed.add_argument(
        "images",
        metavar="IMAGES",
        nargs="?",
        help="a folder (class sub-folders give labels) or a text file with one image path per line "
        "(optionally <TAB>label)",
    )
    embed.add_argument(
        "--split",
        choices=["train", "test", "query", "gallery"],
        help="instead of IMAGES: a split of the model's own dataset",
    )
    embed.add_argument("--out", required=True, metavar="DIR", help="output folder")
    embed.add_argument("--device", default="auto", choices=devices)
    embed.add_argument("--num-workers", default="auto", help="image loading processes, or auto (default)")
    embed.add_argument("--shard-size", type=int, default=8192, help="images per Parquet shard (default 8192)")
    embed.add_argument("--fresh", action="store_true", help="delete DIR first instead of continuing in it")
    embed.add_argument(
        "--params", default="params.yaml", help="for MLflow URIs: the tracking URI (default: params.yaml)"
    )
    embed.set_defaults(func=_embed)

    index = commands.add_parser("index", help="faiss indexes over embeddings: build, eval").add_subparsers(
        dest="index_command", required=True
    )
    build = index.add_parser("build", help="build a faiss inner-product index over a `dcml embed` folder")
    build.add_argument("embeddings", metavar="EMB", help="a folder written by `dcml embed`")
    build.add_argument("--out", required=True, metavar="IDX", help="index folder (replaced if it exists)")
    build.add_argument(
        "--factory",
        default="Flat",
        help="any faiss index_factory string (default Flat: exact); e.g. 'HNSW32,Flat', 'IVF1024,Flat', 'IVF1024,PQ32'",
    )
    build.add_argument(
        "--device", default="auto", choices=devices, help="build on the GPU when faiss-gpu sees one (auto)"
    )
    build.add_argument(
        "--search-params",
        default="",
        metavar="P",
        help="faiss search parameters recorded with the index, e.g. nprobe=16 (IVF) or efSearch=128 (HNSW); "
        "default: faiss's (nprobe=1, efSearch=16), often far from exact: check with `dcml index eval`",
    )
    build.set_defaults(func=_index_build)
    evaluate = index.add_parser(
        "eval", help="label recall@k and MAP@R through the index (a query never retrieves itself)"
    )
    evaluate.add_argument("index", metavar="IDX")
    evaluate.add_argument("--queries", required=True, metavar="EMB", help="a `dcml embed` folder with labels")
    evaluate.add_argument("--k", type=int, nargs="+", help="recall@k for these k (default: the model's eval.recall_ks)")
    evaluate.add_argument("--out", metavar="FILE", help="also write the metrics as JSON to FILE")
    evaluate.add_argument("--no-mlflow", action="store_true", help="do not log to the model's MLflow run")
    evaluate.add_argument("--params", default="params.yaml", help="for the MLflow tracking URI (default: params.yaml)")
    _search_params_option(evaluate)
    evaluate.set_defaults(func=_index_eval)

    search = commands.add_parser("search", help="nearest indexed images of query images or embeddings: JSON lines")
    search.add_argument("index", metavar="IDX")
    queries = search.add_mutually_exclusive_group(required=True)
    queries.add_argument(
        "--image", nargs="+", metavar="FILE", help="query image file(s), embedded with the index's model"
    )
    queries.add_argument(
        "--embedding", metavar="FILE", help="query embedding(s): a .npy (d,) or (n, d), or a `dcml embed` folder"
    )
    search.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    search.add_argument(
        "--learner",
        type=int,
        metavar="I",
        help="search in learner I's sub-space (its slice or mask; see the index's info.json)",
    )
    search.add_argument("--device", default="auto", choices=devices)
    search.add_argument("--params", default="params.yaml", help="for MLflow-sourced models (default: params.yaml)")
    _search_params_option(search)
    search.set_defaults(func=_search)

    serve = commands.add_parser("serve", help="HTTP search service over an index: POST /knn, GET /health")
    serve.add_argument("index", metavar="IDX")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="auto", choices=devices)
    serve.add_argument("--params", default="params.yaml", help="for MLflow-sourced models (default: params.yaml)")
    _search_params_option(serve)
    serve.set_defaults(func=_serve)
