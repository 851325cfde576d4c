"""Wall times of the scale-out paths against their sequential counterparts, on the demo.

1. ``dcml train`` of one run with ``train.nproc_per_node: 1`` vs ``N`` (torchrun).
2. ``dcml sweep`` over K (and seeds) in one process vs ``dcml sweep --workers`` with W
   process workers (``prefect worker start --limit 1``) on the shared stack
   (scripts/stack.py: PostgreSQL + Prefect server + MLflow server, brought up and down here).

Every command runs as a user runs it (a subprocess, its own output folder, fresh runs) and
is timed end to end, Prefect and MLflow included. One JSON object on stdout; the logs stay
in the work folder (``--keep``). The demo's data is generated as ``params.yaml`` says.

    python bench/bench_scaleout.py                         # nproc 2, 2 workers, K 1 4, seed 0
    python bench/bench_scaleout.py --epochs 4 --skip-ddp   # a quicker sweep comparison only
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from dcml.config import load_params, to_dict  # noqa: E402
from scripts import stack  # noqa: E402


def write_params(path: Path, data_root: str, tracking_uri: str, epochs: int | None, nproc: int = 1) -> Path:
    raw = to_dict(load_params(ROOT / "params.yaml"))
    raw["data"]["root"] = data_root
    raw["tracking"]["mlflow_uri"] = tracking_uri
    raw["train"]["nproc_per_node"] = nproc
    if epochs is not None:  # a shorter schedule with the demo's proportions
        scale = epochs / raw["train"]["epochs"]
        raw["train"]["epochs"] = epochs
        for key in ("divide_until_epoch", "finetune_from_epoch"):
            raw["cluster"][key] = max(1, round(raw["cluster"][key] * scale))
    path.write_text(yaml.safe_dump(raw))
    return path


def timed(command: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); see {log}")
    return seconds


def final_metrics(out: Path) -> dict[str, float]:
    found = {}
    for metrics in sorted((out / "runs").glob("*/metrics.json")):
        values = json.loads(metrics.read_text())
        found[metrics.parent.name.rsplit("-", 1)[0]] = round(100 * values["recall@1"], 2)
    return found


def bench_ddp(work: Path, data_root: str, args: argparse.Namespace, env: dict) -> dict:
    results = {}
    for nproc in (1, args.nproc):
        folder = work / f"train-nproc{nproc}"
        folder.mkdir()
        params = write_params(
            folder / "params.yaml", data_root, f"sqlite:///{folder / 'mlflow.db'}", args.epochs, nproc
        )
        command = [str(BIN / "dcml"), "train", "--params", str(params), "--out", str(folder / "out"), "-k", str(args.k)]
        run_env = {**env, "PREFECT_HOME": str(folder / "prefect-home")}
        seconds = timed(command, run_env, folder / "log.txt")
        results[f"nproc{nproc}"] = {"wall_seconds": round(seconds, 1), "recall@1": final_metrics(folder / "out")}
    return results


def bench_sweep(work: Path, data_root: str, args: argparse.Namespace, env: dict) -> dict:
    ks, seeds = [str(k) for k in args.sweep_k], [str(s) for s in args.seeds]
    sequential = work / "sweep-sequential"
    sequential.mkdir()
    params = write_params(sequential / "params.yaml", data_root, f"sqlite:///{sequential / 'mlflow.db'}", args.epochs)
    command = [str(BIN / "dcml"), "sweep", "--params", str(params), "--out", str(sequential / "out")]
    command += ["-k", *ks, "--seeds", *seeds]
    seq_seconds = timed(command, {**env, "PREFECT_HOME": str(sequential / "prefect-home")}, sequential / "log.txt")

    parallel = work / "sweep-workers"
    parallel.mkdir()
    pg, prefect_port, mlflow_port = stack.free_ports(3)
    state = stack.up(parallel / "stack", pg_port=pg, prefect_port=prefect_port, mlflow_port=mlflow_port)
    workers = []
    try:
        api = state["urls"]["prefect_api"]
        stack_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(parallel / "prefect-home")}
        params = write_params(parallel / "params.yaml", data_root, state["urls"]["mlflow"], args.epochs)
        out = parallel / "out"
        deploy = [str(BIN / "dcml"), "deploy", "--workers", "--pool", "bench-pool", "--params", str(params)]
        timed([*deploy, "--out", str(out)], stack_env, parallel / "deploy-log.txt")
        names = [f"worker-{index}" for index in range(args.workers)]
        workers = stack.start_workers("bench-pool", names, stack_env, parallel, ROOT)
        command = [str(BIN / "dcml"), "sweep", "--deployment", "--params", str(params), "--out", str(out)]
        command += ["-k", *ks, "--seeds", *seeds]
        par_seconds = timed(command, stack_env, parallel / "log.txt")
    finally:
        stack.stop_workers(workers)
        stack.down(parallel / "stack", quiet=True)
    return {
        "runs": len({1, *args.sweep_k}) * len(seeds),  # K=1 is always part of a sweep
        "sequential": {"wall_seconds": round(seq_seconds, 1), "recall@1": final_metrics(sequential / "out")},
        f"{args.workers}_workers": {"wall_seconds": round(par_seconds, 1), "recall@1": final_metrics(out)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default 2)")
    parser.add_argument("-k", type=int, default=4, help="K of the data-parallel run (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="process workers of the sweep (default 2)")
    parser.add_argument("--sweep-k", type=int, nargs="+", default=[1, 4], help="K values of the sweep (default 1 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, help="shorter schedule (default: params.yaml's)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs)")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    work = Path(tempfile.mkdtemp(prefix="dcml-bench-scaleout-"))
    data_root = str(work / "demo")
    subprocess.run([str(BIN / "dcml"), "data", "demo", "--root", data_root], cwd=ROOT, env=env, check=True)
    report: dict = {"cpus": os.cpu_count(), "work_folder": str(work)}
    if not args.skip_ddp:
        report["train_data_parallel"] = bench_ddp(work, data_root, args, env)
    if not args.skip_sweep:
        report["sweep_on_workers"] = bench_sweep(work, data_root, args, env)
    print(json.dumps(report, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
