"""Scale rehearsal on CPU: the real pipeline (`dcml train`, Prefect + MLflow) on a dataset of
Stanford Online Products' size and layout, with tiny images and a small CNN.

Generates the SOP-like dataset (``dcml.data.synthetic_sop``) unless it is there, writes a
params file (a copy of ``params.yaml`` with the keys below changed), starts a Prefect
server of its own, runs ``.venv/bin/dcml train --params P --out O -k K`` in a subprocess
against it, and prints one JSON object: wall seconds per phase and their shares, peak RSS,
bytes on disk per run, checkpoints, MLflow store size.

How the numbers are taken:
- ``dcml train`` normally starts a temporary Prefect server that disappears with it; here
  the bench's own server (PREFECT_HOME in the out folder) takes its place so that the task
  runs can be read afterwards (REST API). Its start-up time is measured and counted as
  orchestration, since a plain ``dcml train`` pays it too.
- phase seconds are the Prefect task runs' ``total_run_time`` summed by task-run name:
  ``init-model``, ``train-*``, ``embed-train-*``, ``cluster-*``, ``embed-test-*``,
  ``evaluate-*``, ``summarize-*`` (report), tracking = ``start-tracking-*``, ``log-*``,
  ``end-tracking-*``. orchestration = flow wall - sum of task runs + server start;
  startup = CLI wall - flow wall (imports, preflight, flow-run creation, exit).
- peak RSS: the summed RSS of the ``dcml train`` process tree, polled every 0.5 s (an
  upper bound: shared pages count once per process); the server's separately.

    python bench/bench_scale.py --scale 0.05                 # minutes
    python bench/bench_scale.py --scale 1 --epochs 2 --time-limit 1500 --keep  # SOP size: ~45 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import psutil
import yaml

from dcml.data.synthetic_sop import generate_sop_like

REPO = Path(__file__).resolve().parent.parent

QUIET = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
PHASES = {  # task-run name prefix -> phase (first match wins)
    "init-model": "init",
    "train-": "train",
    "embed-train-": "embed_train",
    "cluster-": "cluster",
    "embed-test-": "embed_test",
    "evaluate-": "evaluate",
    "summarize-": "report",
    "start-tracking": "tracking",
    "log-": "tracking",
    "end-tracking": "tracking",
}


def write_params(path: Path, args: argparse.Namespace, data_root: str, test_images: int, mlflow_db: Path) -> None:
    """``params.yaml`` copied at run time (keys added by others are kept), these keys changed."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    epochs, k = args.epochs, args.num_learners
    changes = {
        "preset": "none",
        "data.dataset": "sop",
        "data.root": data_root,
        "data.image_size": args.image_size,
        "data.resize_size": round(args.image_size * 36 / 32),
        "model.backbone": "small_cnn",
        "model.pretrained": "none",
        "model.embedding_dim": args.embedding_dim,
        "train.epochs": epochs,
        "cluster.num_learners": k,
        "cluster.recluster_every": 1,
        "cluster.divide_until_epoch": epochs,
        "cluster.finetune_from_epoch": epochs,
        "eval.recall_ks": [r for r in (1, 10, 100, 1000) if r < test_images],
        "eval.every_epochs": args.eval_every,
        "eval.nmi": {"true": True, "false": False}.get(args.nmi, args.nmi),
        "tracking.mlflow_uri": f"sqlite:///{mlflow_db}",
        "tracking.log_model": True,
        "sweep.num_learners": [1, k],
    }
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        section = params
        for name in parents:
            section = section[name]  # a KeyError here means params.yaml lost a key we rely on
        section[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def start_prefect_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str, float]:
    """``prefect server start`` on a free port; returns (process, API URL, start-up seconds)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    command = [str(REPO / ".venv/bin/prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off"]
    log = (home.parent / "prefect-server.log").open("w")
    server = subprocess.Popen(command, env={**env, "PREFECT_HOME": str(home)}, stdout=log, stderr=log, cwd=home)
    url = f"http://127.0.0.1:{port}/api"
    while time.perf_counter() - started < 180:
        if server.poll() is not None:
            raise SystemExit(f"prefect server exited ({server.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return server, url, time.perf_counter() - started
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"prefect server did not answer within 180 s; see {log.name}")


class TreeMemory:
    """Peak summed RSS of a process and its descendants, polled in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                for process in [self.process, *self.process.children(recursive=True)]:
                    try:
                        total += process.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_cli(args: argparse.Namespace, params: Path, out: Path, env: dict[str, str]) -> tuple[float, int, bool]:
    """``dcml train`` in a subprocess; returns (wall seconds, peak tree RSS bytes, interrupted).

    Past ``--time-limit`` the run gets SIGINT (Prefect marks it crashed, MLflow failed) and
    the report covers the tasks finished so far.
    """
    command = [str(REPO / ".venv/bin/dcml"), "train", "--params", str(params), "--out", str(out / "outputs")]
    command += ["-k", str(args.num_learners)]
    log = out / "dcml-train.log"
    started, interrupted = time.perf_counter(), False
    with log.open("w") as stream:
        child = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
        memory = TreeMemory(child.pid)
        try:
            returncode = child.wait(timeout=args.time_limit)
        except subprocess.TimeoutExpired:
            interrupted = True
            child.send_signal(signal.SIGINT)
            try:
                returncode = child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                returncode = child.wait()
    wall, peak = time.perf_counter() - started, memory.stop()
    if returncode != 0 and not interrupted:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"dcml train failed ({returncode}); {log}:\n" + "\n".join(tail))
    return wall, peak, interrupted


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def read_runs(api: str, interrupted: bool) -> tuple[dict, list[dict]]:
    """The flow run and its task runs (waits until the server has recorded them all)."""
    deadline, seen = time.monotonic() + (15 if interrupted else 60), -1
    while True:
        flows = [f for f in _post(f"{api}/flow_runs/filter", {"limit": 10}) if f["name"].startswith("dcml-K")]
        if not flows:
            raise SystemExit("no flow run recorded by the Prefect server")
        tasks = _task_runs(api, flows[0]["id"])
        finished = flows[0]["end_time"] and all(task["end_time"] for task in tasks)
        if (finished and len(tasks) == seen) or time.monotonic() > deadline:
            if flows[0]["state_type"] != "COMPLETED" and not interrupted:
                raise SystemExit(f"flow run {flows[0]['name']} ended {flows[0]['state_type']}")
            return flows[0], tasks
        seen = len(tasks)
        time.sleep(1)


def flow_seconds(flow_run: dict) -> float:
    """Time the flow run was running; for a run interrupted without an end, until now."""
    if flow_run["end_time"] or not flow_run["start_time"]:
        return flow_run["total_run_time"]
    return time.time() - datetime.fromisoformat(flow_run["start_time"]).timestamp()


def _task_runs(api: str, flow_run_id: str, page_size: int = 200) -> list[dict]:
    tasks: list[dict] = []
    while True:
        body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": page_size, "offset": len(tasks)}
        page = _post(f"{api}/task_runs/filter", body)
        tasks += page
        if len(page) < page_size:
            return tasks


def phase_seconds(flow_run: dict, tasks: list[dict], cli_wall: float, server_start: float) -> dict[str, float]:
    phases = dict.fromkeys([*dict.fromkeys(PHASES.values()), "other"], 0.0)
    for task in tasks:
        phase = next((p for prefix, p in PHASES.items() if task["name"].startswith(prefix)), "other")
        phases[phase] += task["total_run_time"]
    flow_wall = flow_seconds(flow_run)
    phases["orchestration"] = flow_wall - sum(phases.values()) + server_start
    phases["startup"] = cli_wall - flow_wall
    return phases


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def disk_usage(out: Path) -> dict:
    runs = sorted((out / "outputs" / "runs").glob("K*"))
    run = runs[0]
    parts = {d.name: folder_bytes(d) for d in sorted(run.iterdir()) if d.is_dir()}
    files = sum(p.stat().st_size for p in run.iterdir() if p.is_file())
    db = out / "mlflow.db"
    return {
        "run_folder": str(run),
        "run_folder_bytes": folder_bytes(run),
        "run_folder_bytes_by_part": {**parts, "files": files},
        "checkpoints": len(list(run.rglob("*.pt"))),
        "checkpoint_bytes_each": max((p.stat().st_size for p in run.rglob("*.pt")), default=0),
        "mlflow_store_bytes": {
            "db": db.stat().st_size if db.exists() else 0,
            "artifacts": folder_bytes(out / "mlartifacts"),
        },
        "final_metrics": json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {},
        "recall_at_1_by_epoch": dict(_recall_at_1(path) for path in sorted(run.glob("history/eval-epoch-*.json"))),
    }


def _per_epoch_log(task_name: str) -> bool:
    return task_name.startswith("log-") and "-epoch-" in task_name


def _recall_at_1(path: Path) -> tuple[int, float | None]:
    evaluation = json.loads(path.read_text())
    return evaluation["epoch"], evaluation.get("recall@1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SOP's classes (default 1)")
    parser.add_argument("--root", help="dataset folder (default /tmp/dcml-sop-like[-scale<S>]); generated if missing")
    parser.add_argument("--out", help="output folder, must be absent or empty (default: a new temp folder)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-learners", "-k", type=int, default=8)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument(
        "--eval-every", type=int, default=10, help="eval.every_epochs (default 10, the paper-sop preset's cadence)"
    )
    parser.add_argument(
        "--nmi", choices=["true", "final", "false"], default="final", help="eval.nmi (default final, as paper-sop)"
    )
    parser.add_argument("--time-limit", type=float, help="interrupt dcml train after S seconds, report so far")
    parser.add_argument("--keep", action="store_true", help="keep the output folder (runs, MLflow store, logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.root or "/tmp/dcml-sop-like" + ("" if args.scale == 1 else f"-scale{args.scale:g}")
    dataset = generate_sop_like(root, scale=args.scale, image_size=args.image_size, seed=args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="dcml-bench-scale-")).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty")
    (out / "prefect-home").mkdir(parents=True, exist_ok=True)
    params = out / "params.yaml"
    write_params(params, args, str(Path(root).resolve()), dataset.test_images, out / "mlflow.db")
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(out / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    server, api, server_start = start_prefect_server(out / "prefect-home", env)
    try:
        server_memory = TreeMemory(server.pid)
        cli_wall, peak_rss, interrupted = run_cli(args, params, out, {**env, "PREFECT_API_URL": api})
        flow_run, tasks = read_runs(api, interrupted)
        server_peak = server_memory.stop()
    finally:
        server.terminate()
        server.wait(30)
    phases = phase_seconds(flow_run, tasks, cli_wall, server_start)
    wall = cli_wall + server_start
    evaluation = phases["embed_test"] + phases["evaluate"]
    evaluations = sum(t["name"].startswith("evaluate-") for t in tasks)
    disk = disk_usage(out)
    report = {
        "dataset": {**asdict(dataset), "bytes": folder_bytes(Path(root))},
        "epochs": args.epochs,
        "num_learners": args.num_learners,
        "embedding_dim": args.embedding_dim,
        "interrupted_after_time_limit": interrupted,
        "flow_state": flow_run["state_type"],
        "wall_seconds": {"total": wall, "cli": cli_wall, "flow": flow_seconds(flow_run), "server": server_start},
        "phase_seconds": phases,
        "phase_shares": {name: value / wall for name, value in phases.items()},
        "orchestration_plus_tracking_share": (phases["orchestration"] + phases["tracking"]) / wall,
        "evaluation": {
            "count": evaluations,
            "seconds_each": evaluation / max(1, evaluations),
            "share_of_wall": evaluation / wall,
            "relative_to_train": evaluation / phases["train"] if phases["train"] else None,
        },
        "task_runs": len(tasks),
        "task_seconds": {task["name"]: task["total_run_time"] for task in tasks if not _per_epoch_log(task["name"])},
        "peak_rss_mib": {"dcml_train_tree": peak_rss / 2**20, "prefect_server": server_peak / 2**20},
        **disk,
        "out": str(out) if args.keep else None,
    }
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(_rounded(report), indent=2))


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


if __name__ == "__main__":
    main()
