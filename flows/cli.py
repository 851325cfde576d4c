"""The ``dcml`` command: train, sweep, compare, evaluate, data tools and the scheduled deployment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from dcml.config import ConfigError

# No telemetry from Prefect, MLflow or DVC, also outside `make` (the Makefile sets the
# same); defaults only, so a user can opt in. Set before any of them is imported.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    # Prefect's temporary server takes 12-22 s to start on a small machine (default limit 20 s)
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)

INTERRUPTED = "dcml: interrupted; rerun the same command to continue from the newest checkpoint"


def _train(args: argparse.Namespace) -> None:
    from dcml.config import load_params, with_num_learners
    from flows.divide_and_conquer import divide_and_conquer, run_folder
    from flows.server import own_process_group
    from flows.server_guard import install as guard_server
    from tasks import locks
    from tasks.layout import RunLayout
    from tasks.runs import preflight

    params = load_params(args.params)
    k = params.cluster.num_learners if args.num_learners is None else args.num_learners
    seed = params.seed if args.seed is None else args.seed
    folder = run_folder(args.out, with_num_learners(preflight(args.params, [(k, seed)], args.out), k, seed))
    # owned before the Prefect server starts (the flow holds it too: tasks/locks.py)
    with locks.hold(RunLayout(folder).lock, str(folder), args.wait):
        own_process_group()  # Prefect's temporary server: Ctrl-C reaches dcml only
        guard_server()  # ... and it stops when dcml dies, also by kill -9 (flows/server_guard.py)

        result = divide_and_conquer(args.params, k, seed, args.out, fresh=args.fresh, wait=args.wait)
    print(json.dumps(result, indent=2, default=str))


def _sweep(args: argparse.Namespace) -> None:
    from dcml.config import ConfigError
    from flows.server import own_process_group
    from flows.server_guard import install as guard_server
    from flows.sweep import owning, sweep, sweep_points_of
    from tasks.runs import preflight

    if args.keep:
        _deprecated("--keep", "other run folders are kept unless --prune is given")
    if args.workers:
        _deprecated("--workers", "use --deployment [NAME]")
        args.deployment = args.deployment or args.workers
    args.workers = args.deployment
    points = sweep_points_of(args.params, args.num_learners, args.seeds)
    params = preflight(args.params, points, args.out, local=not args.workers)
    if args.workers and args.concurrent:
        raise ConfigError("--concurrent runs the K values in this process; --deployment on the workers: choose one")
    if args.workers:
        from flows.remote import check_deployment

        check_deployment(args.workers)
    # its MLflow state and run folders (unless workers run them), before the server starts
    with owning(params, points, args.out, args.wait, runs=not args.workers):
        own_process_group()
        guard_server()

        result = sweep(
            args.params,
            args.out,
            args.num_learners,
            args.seeds,
            args.concurrent or None,
            args.prune,
            args.fresh,
            args.wait,
            args.workers,
        )
    print(json.dumps(result, indent=2, default=str))


def _evaluate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from dcml.config import ConfigError
    from dcml.data import build_bundle, load_splits
    from dcml.device import resolve_device
    from dcml.evaluate import checkpoint_test_slices, evaluate_embeddings
    from dcml.metrics import NMI_AVERAGE_METHOD
    from dcml.trainer import Trainer

    if args.num_learners is not None:
        _deprecated("--num-learners/-k of evaluate", "use --slices N")
        args.slices = args.slices if args.slices is not None else args.num_learners
    trainer = Trainer.for_inference(args.checkpoint, resolve_device(args.device))
    params = trainer.params
    data = params.data if args.data_root is None else replace(params.data, root=args.data_root)
    bundle = build_bundle(load_splits(data), data)
    # by default the checkpoint's own test embedding, as the pipeline evaluated it
    slices = checkpoint_test_slices(params, trainer.epochs_done) if args.slices is None else args.slices
    if params.model.learners == "masks" and slices != 1:
        raise ConfigError(
            f"{args.checkpoint} has learner masks, not slices: its test embedding is the full one (--slices 1)"
        )
    embeddings, labels, _ = trainer.embed(bundle.test, num_learners=slices)
    metrics = evaluate_embeddings(embeddings, labels, bundle.splits, params.eval, seed=params.seed)
    if "nmi" in metrics:
        metrics["nmi_average_method"] = NMI_AVERAGE_METHOD
    report = {"checkpoint": args.checkpoint, "epoch": trainer.epochs_done, "num_slices": slices, **metrics}
    print(json.dumps(report, indent=2))


def _deprecated(option: str, instead: str) -> None:
    print(f"dcml: warning: {option} is deprecated and goes away in the next release; {instead}", file=sys.stderr)


def _runs(args: argparse.Namespace) -> None:
    from tasks.inventory import list_runs, table

    rows = list_runs(args.out)
    print(json.dumps(rows, indent=2) if args.json else table(rows))


def _compare(args: argparse.Namespace) -> None:
    from tasks.report import compare_runs, finished_run_dirs

    if args.runs is not None and args.run_dirs:
        raise ConfigError("give RUN_DIR arguments or --runs DIR, not both")
    run_dirs = finished_run_dirs(args.out, args.run_dirs, runs_dir=args.runs)
    metrics = compare_runs.fn(args.out, run_dirs)  # the plain function: no Prefect server
    print(json.dumps({"metrics": metrics, "runs": run_dirs}, indent=2))


def _demo(args: argparse.Namespace) -> None:
    from dcml.config import load_params
    from dcml.data.demo import generate_demo_dataset

    data = load_params(args.params).data
    root = args.root or (data.root if data.dataset == "demo" else "data/demo")
    info = generate_demo_dataset(
        root, images_per_class=data.demo.images_per_class, image_size=data.demo.image_size, seed=data.demo.seed
    )
    print(f"demo dataset: {info.num_classes} classes, {info.num_images} images under {root}")


def _inspect(args: argparse.Namespace) -> None:
    from dcml.data.benchmarks import inspect_dataset

    check_images, test_size = not args.no_check_images, args.vehicleid_test_size
    split = None
    if args.dataset == "folder":
        from dcml.config import load_params

        split = load_params(args.params).data.split if os.path.isfile(args.params) else None
    report = inspect_dataset(
        args.dataset, args.root, check_images=check_images, vehicleid_test_size=test_size, folder_split=split
    )
    print(json.dumps(report, indent=2))


def _fetch(args: argparse.Namespace) -> None:
    from dcml.data.benchmarks import inspect_dataset
    from dcml.data.fetch import archive_for, fetch
    from tasks.progress import download_bar

    archive = archive_for(args.dataset, args.url, args.md5)
    with download_bar(archive.filename) as progress:
        folder = fetch(archive, args.root, progress)
    print(json.dumps(inspect_dataset(args.dataset, folder, check_images=not args.no_check_images), indent=2))


def _deploy(args: argparse.Namespace) -> None:
    from dcml.config import ConfigError
    from flows.deploy import deploy_sweep

    if args.concurrency is not None and not args.workers:
        raise ConfigError("--concurrency limits the runs of --workers; add --workers")
    from flows.server_guard import install as guard_server

    guard_server()  # a temporary server (no PREFECT_API_URL) stops when dcml dies
    deployment_id = deploy_sweep(
        args.name, args.pool, args.cron, args.params, args.out, args.timezone, args.workers, args.concurrency
    )
    schedule = f"{args.cron!r} ({args.timezone})"
    print(f"deployment {args.name!r} ({deployment_id}) on work pool {args.pool!r}, schedule {schedule}")
    if args.workers:
        from flows.remote import RUN_DEPLOYMENT, RUN_QUEUE

        print(f"runs: deployment {RUN_DEPLOYMENT!r}, work queue {RUN_QUEUE!r}; `dcml sweep --deployment` submits to it")
        print(
            "start one worker per GPU (per train.nproc_per_node GPUs) with: CUDA_VISIBLE_DEVICES=<i> "
            f"prefect worker start --pool {args.pool} --work-queue {RUN_QUEUE} --limit 1"
        )
        print(f"and one for the scheduled sweep: prefect worker start --pool {args.pool} --work-queue default")
    else:
        print(f"start a worker with: prefect worker start --pool {args.pool}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="dcml", description=__doc__)
    main.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = main.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sub.add_argument("--out", default="outputs", help="output folder for runs and reports (default: outputs)")

    def fresh(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--fresh",
            action="store_true",
            help="start over: delete the run folder(s) of these params first. Without it a rerun continues "
            "from the newest checkpoint, also after a code change (the code version is recorded per epoch range)",
        )
        sub.add_argument(
            "--wait",
            action="store_true",
            help="when another process is running the same run (or sweep) in OUT, wait until it ends, then "
            "continue from what it left (default: exit with status 2, naming that process)",
        )

    train = commands.add_parser("train", help="one Divide-and-Conquer run (Prefect flow)")
    common(train)
    train.add_argument("--num-learners", "-k", type=int, help="K, overrides cluster.num_learners (1 = baseline)")
    train.add_argument("--seed", type=int, help="overrides the top-level seed")
    fresh(train)
    train.set_defaults(func=_train)

    sweep = commands.add_parser("sweep", help="train every K of sweep.num_learners (K=1 always added) and compare")
    common(sweep)
    sweep.add_argument("--num-learners", "-k", type=int, nargs="+", help="K values (default: sweep.num_learners)")
    sweep.add_argument("--seeds", type=int, nargs="+", help="seeds (default: sweep.seeds)")
    sweep.add_argument("--concurrent", action="store_true", help="run the K values concurrently (threads)")
    sweep.add_argument(
        "--prune",
        action="store_true",
        help="delete the run folders under OUT/runs that this sweep did not produce (other params, a `dcml "
        "train`), so that DVC versions only this sweep; folders another process holds are kept. Default: keep",
    )
    sweep.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)  # deprecated: keeping is the default
    sweep.add_argument(
        "--deployment",
        nargs="?",
        const="divide-and-conquer/dcml-run",
        default=None,
        metavar="NAME",
        help="run on Prefect workers: submit each run as a flow run of the deployment NAME (default "
        "divide-and-conquer/dcml-run, made by `dcml deploy --workers`); needs PREFECT_API_URL, and OUT and the "
        "params on a filesystem the workers share",
    )
    sweep.add_argument("--workers", nargs="?", const="divide-and-conquer/dcml-run", help=argparse.SUPPRESS)
    fresh(sweep)
    sweep.set_defaults(func=_sweep)

    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on its test split, print JSON")
    evaluate.add_argument("checkpoint", help="a checkpoint written by training (outputs/runs/*/checkpoints/*.pt)")
    evaluate.add_argument("--data-root", help="dataset folder if it moved since training")
    evaluate.add_argument("--num-learners", "-k", type=int, default=None, help=argparse.SUPPRESS)  # deprecated
    evaluate.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices to normalise separately (default: as the pipeline evaluated this checkpoint — under "
        "eval.embedding: schedule K while dividing, 1 after; K under slices; 1 under full or with "
        "model.learners: masks)",
    )
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.set_defaults(func=_evaluate)

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    demo = data.add_parser(
        "demo", help="generate the embedded demo dataset (deterministic, offline) as params.yaml's data.demo says"
    )
    demo.add_argument("--params", default="params.yaml", help="reads data.demo and data.root (default: params.yaml)")
    demo.add_argument("--root", help="output folder (default: data.root)")
    demo.set_defaults(func=_demo)
    inspect = data.add_parser("inspect", help="validate a benchmark folder and print counts per split as JSON")
    inspect.add_argument(
        "--dataset", required=True, choices=["folder", "cub200", "cars196", "sop", "inshop", "vehicleid"]
    )
    inspect.add_argument("--root", required=True, help="the dataset's folder as extracted from its archive")
    inspect.add_argument(
        "--params", default="params.yaml", help="folder: the class split (data.split) of this file, if it exists"
    )
    inspect.add_argument(
        "--no-check-images", action="store_true", help="only check that files exist; do not decode images"
    )
    inspect.add_argument(
        "--vehicleid-test-size", type=int, choices=[800, 1600, 2400], help="VehicleID: one test list (default all)"
    )
    inspect.set_defaults(func=_inspect)

    fetch = data.add_parser(
        "fetch", help="download a benchmark archive (resumable, MD5-checked), unpack it, then inspect it"
    )
    fetch.add_argument("dataset", choices=["cub200", "sop"], help="benchmarks with a stable download address")
    fetch.add_argument("--root", default="data", help="where the archive and its folder go (default: data)")
    fetch.add_argument("--url", help="another address of the same archive (a mirror)")
    fetch.add_argument("--md5", help="the MD5 of the archive at --url, when it differs from the listed one")
    fetch.add_argument("--no-check-images", action="store_true", help="inspect: only check that files exist")
    fetch.set_defaults(func=_fetch)

    compare = commands.add_parser(
        "compare", help="compare finished runs (mean ± std per variant, paired differences to K=1) into OUT"
    )
    compare.add_argument("--out", default="outputs", help="where the comparison goes (default: outputs)")
    compare.add_argument("--runs", metavar="DIR", help="compare every finished run folder in DIR (default: OUT/runs)")
    compare.add_argument(
        "run_dirs", nargs="*", metavar="RUN_DIR", help="run folders (default: every finished one under OUT/runs)"
    )
    compare.set_defaults(func=_compare)

    runs = commands.add_parser("runs", help="list the run folders under OUT/runs: K, seed, variant, epoch, state, R@1")
    runs.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    runs.add_argument("--json", action="store_true", help="JSON instead of a table")
    runs.set_defaults(func=_runs)

    serve = commands.add_parser("deploy", help="register the sweep as a scheduled deployment on a process work pool")
    common(serve)
    serve.add_argument("--name", default="k-sweep", help="deployment name")
    serve.add_argument("--pool", default="dcml-process", help="process work pool (created if missing)")
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule (default: every day at 02:00)")
    serve.add_argument("--timezone", default="UTC", help="IANA time zone the cron schedule is read in (default: UTC)")
    serve.add_argument(
        "--workers",
        action="store_true",
        help="also deploy the single run (divide-and-conquer/dcml-run): sweeps then run their (K, seed) runs "
        "concurrently on the pool's workers",
    )
    serve.add_argument("--concurrency", type=int, help="with --workers: at most this many runs at once (all workers)")
    serve.set_defaults(func=_deploy)

    from flows.cli_params import add_commands as add_params_commands
    from flows.cli_retrieval import add_commands

    add_commands(commands)
    add_params_commands(commands)
    return main


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dcml")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    from flows.interrupt import deferred_while_prefect_runs

    args = parser().parse_args(argv)
    try:
        with deferred_while_prefect_runs():
            return _run(args)
    except BaseException as error:  # Ctrl-C, also during the imports: one line, not a traceback
        if not _interrupted(error):
            raise
        print(INTERRUPTED, file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


def _interrupted(error: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an error raised while handling one (Prefect's own, at times)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _run(args: argparse.Namespace) -> int:
    from dcml.checkpoint import CheckpointError
    from dcml.config import ConfigError
    from dcml.data.errors import DatasetError
    from dcml.retrieval import RetrievalError
    from tasks.locks import BusyError

    try:
        args.func(args)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, BusyError, RetrievalError) as error:
        print(f"dcml: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
