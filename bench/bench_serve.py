"""``dcml serve`` end to end: latency of one image and throughput of batches over HTTP.

Builds what a user would: ``--images`` JPEG files (``--jpeg-size``, default 256x256) in
a temporary class folder, a seeded untrained small_cnn checkpoint at 64 px
(``bench_embed.make_checkpoint``: the repository's ``params.yaml`` shrunk), then runs the
commands as subprocesses: ``python -m flows.cli embed``, ``index build`` (Flat) and
``serve IDX --host 127.0.0.1 --port <free port>`` (its own process group; stopped with
SIGINT, then SIGKILL, at the end). Timed with one keep-alive ``httpx`` client:

- ``single_image``: ``--requests`` POST /knn, each one base64 JPEG file, k = ``--k``
  (after ``--warmup`` untimed ones): p50/p90/p99/mean/max milliseconds, requests/s.
  ``top1_is_query``: share of answers whose first hit is the query file itself.
- ``single_embedding``: the same with ``{"embedding": [...]}``: search + HTTP + JSON
  without decoding and the forward pass.
- ``batch``: ``--batch-requests`` POST /knn with ``--batch-size`` images each:
  requests/s, images/s and latency percentiles.
- ``concurrent``: ``--clients`` threads (own clients) sending single images: requests/s.
- ``in_process``: the same single-image query through ``Searcher.embed_images`` +
  ``Searcher.search`` in this process (no HTTP): what the server adds is the difference.

Also: ``embed_s``, ``index_build_s`` (CLI wall times), ``server_start_s`` (process start
until /health answers), ``server_exit`` (how the server stopped).

    .venv/bin/python bench/bench_serve.py            # 3,000 images, 200 requests, 32-image batches
    .venv/bin/python bench/bench_serve.py --quick    # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import REPO_ROOT, finish, machine, make_checkpoint  # noqa: E402
from bench_gpu import log  # noqa: E402
from common import parse_size, temp_folder, write_jpeg_folder  # noqa: E402

from dcml.retrieval import store  # noqa: E402
from dcml.retrieval.images import list_images  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*arguments: str, timeout: float = 1800) -> tuple[float, str]:
    """(wall seconds, stdout) of ``python -m flows.cli ARGUMENTS``; raises on failure."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"dcml {' '.join(arguments[:2])} exited {done.returncode}: {done.stderr[-1500:]}")
    return time.perf_counter() - start, done.stdout


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
    }


def timed_posts(client: httpx.Client, url: str, bodies: list[dict[str, Any]], warmup: int) -> tuple[list, list]:
    """(latencies in seconds, answers) of POSTing ``bodies`` in turn after ``warmup`` untimed ones."""
    for body in bodies[:warmup]:
        client.post(url, json=body).raise_for_status()
    latencies, answers = [], []
    for body in bodies:
        start = time.perf_counter()
        response = client.post(url, json=body)
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()
        answers.append(response.json())
    return latencies, answers


class Server:
    """``python -m flows.cli serve IDX`` in its own process group, output to a log file."""

    def __init__(self, index: Path, port: int, device: str, log_file: Path) -> None:
        command = [sys.executable, "-m", "flows.cli", "serve", str(index), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--device", device]
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        self._log = open(log_file, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from the process start until GET /health answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dcml serve exited {self.process.returncode}: {self.log_file.read_text()[-1500:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"dcml serve did not answer /health within {timeout} s")

    def stop(self) -> dict[str, Any]:
        """SIGINT to the process group, SIGKILL after 20 s."""
        how = "SIGINT"
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                how = "SIGKILL after 20 s"
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        else:
            how = "had exited"
        self._log.close()
        return {"how": how, "returncode": self.process.returncode}


def concurrent_rate(url: str, bodies: list[dict[str, Any]], clients: int) -> dict[str, Any]:
    """``clients`` threads, each with its own keep-alive client, sharing ``bodies``."""
    lock, position, errors = threading.Lock(), [0], []

    def work() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    if position[0] >= len(bodies):
                        return
                    body = bodies[position[0]]
                    position[0] += 1
                try:
                    client.post(url, json=body).raise_for_status()
                except httpx.HTTPError as error:
                    errors.append(str(error))

    threads = [threading.Thread(target=work) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"clients": clients, "requests": len(bodies), "requests_per_s": len(bodies) / seconds, "errors": len(errors)}


def in_process(index: Path, files: list[str], k: int, requests: int) -> dict[str, Any]:
    """Single-image queries through the Searcher the server holds, without HTTP."""
    from flows.cli_retrieval import searcher_for

    searcher = searcher_for(str(index), "cpu", True, "params.yaml")
    payloads = [Path(files[i % len(files)]).read_bytes() for i in range(requests)]
    for data in payloads[:5]:
        searcher.search(searcher.embed_images([data]), k)
    latencies = []
    for data in payloads:
        start = time.perf_counter()
        searcher.search(searcher.embed_images([data]), k)
        latencies.append(time.perf_counter() - start)
    return {"requests": requests, **percentiles(latencies)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="indexed JPEG files (plus 2 of a test class)")
    parser.add_argument("--jpeg-size", default="256", help="W or WxH of the files (default 256)")
    parser.add_argument("--image-size", type=int, default=64, help="the small_cnn's input")
    parser.add_argument("--requests", type=int, default=200, help="timed single-image requests")
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests first")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch request")
    parser.add_argument("--batch-requests", type=int, default=30, help="timed batch requests")
    parser.add_argument("--clients", type=int, default=4, help="threads of the concurrent section (0 skips it)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="the server's --device")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 images, 30 requests, 3 batches")
    parser.add_argument("--tmp-dir", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.requests, args.batch_requests, args.warmup = 200, 30, 3, 3
    started = time.perf_counter()
    report: dict[str, Any] = {"config": vars(args), "machine": machine(torch.device("cpu"))}
    with temp_folder(args.tmp_dir) as folder:
        root, emb, idx = folder / "jpegs", folder / "emb", folder / "idx"
        log(f"[bench_serve] writing {args.images} JPEGs, embedding, building the index ...")
        report["dataset"] = write_jpeg_folder(root, args.images, size=parse_size(args.jpeg_size))
        checkpoint = make_checkpoint(folder / "model.pt", image_size=args.image_size)
        report["embed_s"], _ = cli("embed", str(checkpoint), str(root), "--out", str(emb), "--device", "cpu")
        report["index_build_s"], _ = cli("index", "build", str(emb), "--out", str(idx), "--device", "cpu")
        files = list(list_images(root).paths)  # index id i is file i
        report["indexed"] = len(files)
        encoded = [base64.b64encode(Path(path).read_bytes()).decode() for path in files]
        vectors = store.read_embeddings(emb).embeddings
        ids = [i % len(files) for i in range(args.warmup, args.warmup + args.requests)]

        server = Server(idx, free_port(), args.device, folder / "serve.log")
        try:
            report["server_start_s"] = server.wait_ready()
            url = f"{server.url}/knn"
            with httpx.Client(timeout=120) as client:
                log("[bench_serve] single images ...")
                bodies = [{"image": encoded[i], "k": args.k} for i in ids]
                latencies, answers = timed_posts(client, url, bodies, args.warmup)
                top1 = [a["neighbors"][0]["id"] == i for a, i in zip(answers, ids, strict=True)]
                report["single_image"] = {
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / sum(latencies),
                    **percentiles(latencies),
                    "top1_is_query": float(np.mean(top1)),
                    "request_kib": float(np.mean([len(encoded[i]) for i in ids]) / 1024),
                }
                log("[bench_serve] single embeddings ...")
                bodies = [{"embedding": vectors[i].tolist(), "k": args.k} for i in ids]
                latencies, _ = timed_posts(client, url, bodies, args.warmup)
                report["single_embedding"] = {
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / sum(latencies),
                    **percentiles(latencies),
                }
                log(f"[bench_serve] batches of {args.batch_size} images ...")
                b = args.batch_size
                bodies = [
                    {"images": [encoded[(r * b + j) % len(files)] for j in range(b)], "k": args.k}
                    for r in range(args.batch_requests)
                ]
                latencies, answers = timed_posts(client, url, bodies, min(args.warmup, 2))
                report["batch"] = {
                    "batch_size": b,
                    "requests": len(latencies),
                    "requests_per_s": len(latencies) / sum(latencies),
                    "images_per_s": len(latencies) * b / sum(latencies),
                    **percentiles(latencies),
                    "answers_complete": all(len(a["results"]) == b for a in answers),
                }
            if args.clients > 0:
                log(f"[bench_serve] {args.clients} concurrent clients ...")
                bodies = [{"image": encoded[i], "k": args.k} for i in ids]
                report["concurrent"] = concurrent_rate(url, bodies, args.clients)
        finally:
            report["server_exit"] = server.stop()
        log("[bench_serve] in process ...")
        report["in_process"] = in_process(idx, files, args.k, args.requests)
    return finish(report, started)


if __name__ == "__main__":
    main()
