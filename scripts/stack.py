#!/usr/bin/env python3
"""The shared stack: PostgreSQL + Prefect server + MLflow tracking server (+ a DVC remote folder).

Production picture
------------------
One *server host* runs this stack. It holds everything the workers share:

* **PostgreSQL** with two databases, ``prefect`` (Prefect's API state: flow runs, deployments,
  work pools) and ``mlflow`` (experiments, runs, params, metrics). SQLite, the project's
  default, does not take concurrent writers from several hosts; PostgreSQL does.
* **Prefect server** on that database: the API the workers poll and report to, and the UI.
* **MLflow tracking server** on that database, *proxying* artifacts: clients log to
  ``mlflow-artifacts:`` URIs and the server writes the files under ``<stack>/mlartifacts``,
  so worker hosts need no access to the artifact store itself.
* **A DVC remote**, here the folder ``<stack>/dvc-remote`` (on a real server: a shared
  filesystem, S3, SSH, ...).

The GPU *worker hosts* then only need three things: ``PREFECT_API_URL``, the MLflow URL
(``MLFLOW_TRACKING_URI``, or ``tracking.mlflow_uri`` in params.yaml for the dcml pipeline),
and the shared output folder / DVC remote. ``python scripts/stack.py env`` prints them.

This script is the single-host rehearsal of that picture (and the fixture of
tests/test_stack.py): every service binds to 127.0.0.1 only, PostgreSQL trusts local
connections and keeps its data in a throwaway directory that ``down`` deletes. Exposing the
stack to other hosts needs authentication (PostgreSQL passwords, MLflow/Prefect auth or a
reverse proxy) and is deliberately not done here.

Usage::

    python scripts/stack.py up      [--dir DIR] [--pg-port N] [--prefect-port N] [--mlflow-port N]
    python scripts/stack.py status  [--dir DIR]      # JSON; exit 0 when up, 3 when not
    python scripts/stack.py env     [--dir DIR]      # eval "$(python scripts/stack.py env)"
    python scripts/stack.py down    [--dir DIR]

Standard library only; the services themselves come from the project's virtual environment
(``prefect``, ``mlflow``, the ``stack`` extra for the psycopg driver) and from Debian's
``postgresql`` package. Importable: :func:`up`, :func:`down`, :func:`status`, :func:`env_lines`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_DIR = ".stack"
DEFAULT_PORTS = {"pg": 55432, "prefect": 4200, "mlflow": 5000}
PORT_ENV = {"pg": "DCML_STACK_PG_PORT", "prefect": "DCML_STACK_PREFECT_PORT", "mlflow": "DCML_STACK_MLFLOW_PORT"}
DIR_ENV = "DCML_STACK_DIR"
PG_USER = "dcml"  # the database superuser initdb creates (trust auth, 127.0.0.1 only)
DATABASES = ("prefect", "mlflow")
PG_SYSTEM_USER = "postgres"  # initdb and postgres refuse to run as root: they run as this user
HEALTH_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0
STATE_FILE = "stack.json"
SOCKET_PATH_MAX = 100  # a unix socket path must fit in sun_path (108 bytes with the NUL)
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}

# Popen objects of the servers this process started: polled in down() so that they are reaped
# (no zombies, no "subprocess is still running" warnings) when up() and down() share a process.
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(Exception):
    """A failure with the exit code the CLI returns: 2 = refused before starting, 1 = failed."""

    def __init__(self, message: str, exit_code: int = 1, log_tail: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail


def say(message: str) -> None:
    print(f"stack: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


def resolve_stack_dir(stack_dir: str | os.PathLike | None = None) -> Path:
    return Path(stack_dir or os.environ.get(DIR_ENV) or DEFAULT_DIR).resolve()


def resolve_ports(pg_port: int | None = None, prefect_port: int | None = None, mlflow_port: int | None = None) -> dict:
    """Flag, else DCML_STACK_*_PORT, else the default."""
    given = {"pg": pg_port, "prefect": prefect_port, "mlflow": mlflow_port}
    ports = {}
    for name, value in given.items():
        if value is None:
            value = os.environ.get(PORT_ENV[name]) or DEFAULT_PORTS[name]
        ports[name] = int(value)
    if len(set(ports.values())) != len(ports):
        raise StackError(f"the three ports must differ: {ports}", exit_code=2)
    return ports


def urls(ports: dict) -> dict:
    return {
        "prefect_api": f"http://{HOST}:{ports['prefect']}/api",
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "pg": f"postgresql://{PG_USER}@{HOST}:{ports['pg']}/mlflow",
    }


def pg_url(ports: dict, database: str, driver: str = "") -> str:
    scheme = f"postgresql+{driver}" if driver else "postgresql"
    return f"{scheme}://{PG_USER}@{HOST}:{ports['pg']}/{database}"


def child_env(**extra: str) -> dict:
    env = {**os.environ, **TELEMETRY_OFF, **extra}
    env.pop("PREFECT_API_URL", None)  # the server must not talk to another API
    return env


# --------------------------------------------------------------------------- programs


def _version_key(path: Path) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def find_pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/*/bin, else `pg_config --bindir`, else initdb on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "createdb")):
            return bindir
    raise StackError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: apt-get install postgresql", exit_code=2
    )


def find_program(name: str) -> str:
    """A console script of the running interpreter's environment (the venv), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: run `make install` (pip install -e '.[stack]')", exit_code=2)
    return found


def check_psycopg(mlflow_program: str) -> None:
    """MLflow's PostgreSQL store needs the psycopg (v3) driver in the mlflow program's environment."""
    same_env = Path(mlflow_program).parent == Path(sys.executable).parent
    if same_env and importlib.util.find_spec("psycopg") is None:
        raise StackError(
            "MLflow's PostgreSQL backend needs psycopg: pip install 'psycopg[binary]>=3.1' "
            "(the `stack` extra: pip install -e '.[stack]')",
            exit_code=2,
        )


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...], or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): tells a reused pid from ours."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """Running (not a zombie) and, when `start` is given, the same process as recorded."""
    if not pid:
        return False
    _reap(pid)
    fields = _proc_stat(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc: the signal-0 probe (a zombie counts as alive here)
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _wait_until(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def stop_group(pid: int | None, start: int | None, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by `pid` (started with start_new_session), SIGKILL after `grace`."""
    if not pid:
        return
    if pid_alive(pid) and not pid_alive(pid, start):
        return  # the pid now belongs to another process: not ours to signal
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_members(pid) and not pid_alive(pid):
            break
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        if _wait_until(lambda: not group_members(pid) and not pid_alive(pid), wait):
            break
    _reap(pid)


def spawn(argv: list[str], log_path: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """Start a detached server (own session and process group), output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    _CHILDREN[process.pid] = process
    return process


def log_tail(path: Path | str, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def wait_http(url: str, pid: int, log_path: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early when the server process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise StackError(f"{log_path.stem} exited before {url} answered", log_tail=log_tail(log_path))
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    raise StackError(f"{url} did not answer within {timeout:.0f}s", log_tail=log_tail(log_path))


def port_in_use(port: int) -> bool:
    """True when something listens on 127.0.0.1:port (or on all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers don't count
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def check_ports_free(ports: dict) -> None:
    busy = {name: port for name, port in ports.items() if port_in_use(port)}
    if busy:
        flags = ", ".join(f"--{name}-port" for name in busy)
        raise StackError(
            f"port(s) already in use on {HOST}: {busy}; stop what uses them or choose others ({flags})", exit_code=2
        )


# --------------------------------------------------------------------------- state


def state_path(stack_dir: Path) -> Path:
    return stack_dir / STATE_FILE


def read_state(stack_dir: Path) -> dict | None:
    try:
        return json.loads(state_path(stack_dir).read_text())
    except FileNotFoundError:
        return None


def write_state(stack_dir: Path, state: dict) -> None:
    """Atomically: a temporary file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=".stack-", suffix=".json", dir=stack_dir)
    os.fchmod(fd, 0o644)  # no secrets in it (trust auth, no passwords)
    with os.fdopen(fd, "w") as out:
        json.dump(state, out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(tmp, state_path(stack_dir))


@contextlib.contextmanager
def locked(stack_dir: Path):
    """One `up`/`down` at a time per stack directory (an flock on <stack>/.lock)."""
    stack_dir.mkdir(parents=True, exist_ok=True)
    with open(stack_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def services_alive(state: dict) -> dict:
    return {name: pid_alive(s.get("pid"), s.get("start")) for name, s in state.get("services", {}).items()}


# --------------------------------------------------------------------------- PostgreSQL


def pg_run_as() -> str | None:
    """The system user the PostgreSQL programs run as: `postgres` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise StackError(
            f"running as root: initdb needs the '{PG_SYSTEM_USER}' system user (apt-get install postgresql)",
            exit_code=2,
        ) from None
    if not shutil.which("runuser"):
        raise StackError("running as root: `runuser` (util-linux) is needed to run PostgreSQL as postgres", 2)
    return PG_SYSTEM_USER


def as_user(run_as: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", run_as, "--", *argv] if run_as else argv


def _give_to(path: Path, user: str | None) -> None:
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _usable_by(path: Path, user: str | None) -> bool:
    """Can `user` reach and write `path` (every parent traversable)?"""
    if not user:
        return True
    check = subprocess.run(as_user(user, ["test", "-w", str(path), "-a", "-x", str(path)]), check=False)
    return check.returncode == 0


def prepare_pg_root(stack_dir: Path, port: int, run_as: str | None) -> tuple[Path, bool]:
    """The folder for the data directory and the unix socket, owned by the user running postgres.

    `<stack>/pg` when that user can reach it; otherwise (a stack dir under /root, a socket path
    too long for sun_path) a fresh mkdtemp in /tmp. Returns (folder, is_temporary)."""
    pg_root = stack_dir / "pg"
    socket_fits = len(str(pg_root / f".s.PGSQL.{port}")) <= SOCKET_PATH_MAX
    if socket_fits:
        pg_root.mkdir(mode=0o700, exist_ok=True)
        _give_to(pg_root, run_as)
        if _usable_by(pg_root, run_as):
            return pg_root, False
        shutil.rmtree(pg_root, ignore_errors=True)
        say(f"{pg_root} is not reachable by user {run_as}: data directory goes to /tmp")
    tmp_root = Path(tempfile.mkdtemp(prefix="dcml-stack-pg-", dir="/tmp"))
    _give_to(tmp_root, run_as)
    return tmp_root, True


def _run_logged(argv: list[str], log_path: Path, timeout: float, what: str, cwd: Path | None = None) -> None:
    """Run a short command to completion, its output appended to `log_path`."""
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        log.flush()
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False,
            start_new_session=True, env=child_env(LC_ALL="C"), cwd=cwd,
        )  # fmt: skip
    if result.returncode != 0:
        raise StackError(f"{what} failed (exit {result.returncode})", log_tail=log_tail(log_path))


def init_pg_data(bindir: Path, data_dir: Path, run_as: str | None, log_path: Path) -> None:
    """A fresh cluster; superuser `dcml`; trust auth for the unix socket and 127.0.0.1 only."""
    argv = [str(bindir / "initdb"), "-D", str(data_dir), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--locale=C"]
    # cwd: a folder the postgres user can enter (ours may be /root)
    _run_logged(as_user(run_as, [*argv, "--no-sync"]), log_path, 180, "initdb", cwd=data_dir.parent)
    (data_dir / "pg_hba.conf").write_text(
        "# written by scripts/stack.py: a throwaway cluster, reachable from this host only\n"
        "local all all trust\n"
        "host  all all 127.0.0.1/32 trust\n"
    )


def start_pg(bindir: Path, data_dir: Path, socket_dir: Path, port: int, run_as: str | None, log_path: Path) -> int:
    """`pg_ctl start` (waits until it accepts connections); returns the postmaster's pid."""
    options = f"-h {HOST} -p {port} -k {shlex.quote(str(socket_dir))}"
    argv = [str(bindir / "pg_ctl"), "-D", str(data_dir), "-o", options, "-w", "-t", "120", "start"]
    _run_logged(as_user(run_as, argv), log_path, 180, "pg_ctl start", cwd=data_dir.parent)
    return int((data_dir / "postmaster.pid").read_text().split()[0])


def create_databases(bindir: Path, port: int, log_path: Path) -> None:
    for name in DATABASES:
        argv = [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", PG_USER, "-w", name]
        _run_logged(argv, log_path, 60, f"createdb {name}")


def stop_pg(pg: dict, log_path: Path) -> None:
    """`pg_ctl stop -m fast`; if that fails, signal the postmaster (SIGQUIT, then SIGKILL)."""
    data_dir = Path(pg["data_dir"])
    if (data_dir / "postmaster.pid").exists():
        argv = [str(Path(pg["bindir"]) / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "-t", "60", "stop"]
        try:
            _run_logged(as_user(pg.get("run_as"), argv), log_path, 90, "pg_ctl stop", cwd=data_dir.parent)
        except (StackError, subprocess.TimeoutExpired) as error:
            say(f"{error}; signalling the postmaster")
    pid, start = pg.get("pid"), pg.get("start")
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        if not pid_alive(pid, start):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        _wait_until(lambda: not pid_alive(pid, start), STOP_GRACE_S)


def remove_pg_root(pg: dict) -> None:
    root = Path(pg["root"])
    if root.exists():
        shutil.rmtree(root)


# --------------------------------------------------------------------------- servers


def start_prefect(stack_dir: Path, ports: dict, logs: Path, program: str) -> subprocess.Popen:
    home = stack_dir / "prefect-home"
    home.mkdir(exist_ok=True)
    db_url = pg_url(ports, "prefect", driver="asyncpg")
    env = child_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=db_url,  # the name Prefect 3 reads first
        PREFECT_API_DATABASE_CONNECTION_URL=db_url,  # its older alias, set alike
    )
    argv = [program, "server", "start", "--host", HOST, "--port", str(ports["prefect"])]
    return spawn(argv, logs / "prefect.log", env, cwd=stack_dir)


def start_mlflow(stack_dir: Path, ports: dict, logs: Path, program: str) -> subprocess.Popen:
    artifacts = stack_dir / "mlartifacts"
    artifacts.mkdir(exist_ok=True)
    argv = [
        program, "server",
        "--backend-store-uri", pg_url(ports, "mlflow", driver="psycopg"),
        "--artifacts-destination", str(artifacts),  # proxied: clients log to mlflow-artifacts:
        "--host", HOST, "--port", str(ports["mlflow"]),
        "--workers", "1",
    ]  # fmt: skip
    # MLflow 3's job runner (huey consumers for GenAI scorers/jobs) is several more processes and a
    # /dev/shm folder left behind per start; experiment tracking does not need it (opt in by setting it)
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"))
    return spawn(argv, logs / "mlflow.log", env, cwd=stack_dir)


def _service(process: subprocess.Popen, port: int, url: str) -> dict:
    pid = process.pid
    return {"pid": pid, "start": proc_start_time(pid), "port": port, "url": url}


# --------------------------------------------------------------------------- commands


def _already_up(stack_dir: Path) -> dict | None:
    """The state of a running stack, None when there is none (a stale one is cleaned up first)."""
    state = read_state(stack_dir)
    if state is None:
        return None
    alive = services_alive(state)
    if alive and all(alive.values()):
        return state
    if any(alive.values()):
        raise StackError(f"the stack in {stack_dir} is partly up {alive}: run `down` first")
    say(f"stale state in {state_path(stack_dir)} (no service alive): cleaning up")
    _down(stack_dir, quiet=True)
    return None


def up(
    stack_dir: str | os.PathLike | None = None,
    pg_port: int | None = None,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    *,
    timeout: float = HEALTH_TIMEOUT_S,
) -> dict:
    """Start PostgreSQL, the Prefect server and the MLflow server; return the state (stack.json).

    Returns the existing state (``already_up`` true) when the stack already runs. Raises
    StackError (exit_code 2: refused before starting anything; 1: a service failed, everything
    started is stopped again)."""
    stack_dir = resolve_stack_dir(stack_dir)
    with locked(stack_dir):
        running = _already_up(stack_dir)
        if running is not None:
            return {**running, "already_up": True}
        return _up(stack_dir, resolve_ports(pg_port, prefect_port, mlflow_port), timeout)


def _up(stack_dir: Path, ports: dict, timeout: float) -> dict:
    check_ports_free(ports)
    bindir, run_as = find_pg_bindir(), pg_run_as()
    prefect_program, mlflow_program = find_program("prefect"), find_program("mlflow")
    check_psycopg(mlflow_program)

    logs = stack_dir / "logs"
    logs.mkdir(exist_ok=True)
    (stack_dir / "dvc-remote").mkdir(exist_ok=True)
    state = {
        "stack_dir": str(stack_dir),
        "host": HOST,
        "ports": ports,
        "urls": urls(ports),
        "dvc_remote": str(stack_dir / "dvc-remote"),
        "artifacts": str(stack_dir / "mlartifacts"),
        "logs": str(logs),
        "services": {},
        "timings_s": {},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    began = time.monotonic()
    try:
        _up_postgres(state, stack_dir, ports, bindir, run_as, logs)
        prefect = start_prefect(stack_dir, ports, logs, prefect_program)
        _wait_server(state, "prefect", prefect, ports["prefect"], state["urls"]["prefect_api"], timeout)
        mlflow = start_mlflow(stack_dir, ports, logs, mlflow_program)
        _wait_server(state, "mlflow", mlflow, ports["mlflow"], state["urls"]["mlflow"], timeout)
    except BaseException:
        say("start failed: stopping what was started")
        _down(stack_dir, quiet=True)
        raise
    state["timings_s"]["total"] = round(time.monotonic() - began, 1)
    write_state(stack_dir, state)
    return state


def _up_postgres(state: dict, stack_dir: Path, ports: dict, bindir: Path, run_as: str | None, logs: Path) -> None:
    began = time.monotonic()
    log_path = logs / "postgres.log"
    root, is_tmp = prepare_pg_root(stack_dir, ports["pg"], run_as)
    pg = {"bindir": str(bindir), "run_as": run_as, "root": str(root), "root_is_tmp": is_tmp,
          "data_dir": str(root / "data"), "socket_dir": str(root), "port": ports["pg"], "pid": None, "start": None,
          "url": urls(ports)["pg"]}  # fmt: skip
    state["services"]["postgres"] = pg
    write_state(stack_dir, state)  # from here on `down` knows what to remove
    init_pg_data(bindir, root / "data", run_as, log_path)
    pid = start_pg(bindir, root / "data", root, ports["pg"], run_as, log_path)
    pg.update(pid=pid, start=proc_start_time(pid))
    write_state(stack_dir, state)
    create_databases(bindir, ports["pg"], log_path)
    state["timings_s"]["postgres"] = round(time.monotonic() - began, 1)
    say(f"postgres  {HOST}:{ports['pg']} (databases {', '.join(DATABASES)}) ready in {state['timings_s']['postgres']}s")


def _wait_server(state: dict, name: str, process: subprocess.Popen, port: int, url: str, timeout: float) -> None:
    """Record the server in stack.json, then wait for `<url>/health`."""
    began = time.monotonic()
    state["services"][name] = _service(process, port, url)
    write_state(Path(state["stack_dir"]), state)
    wait_http(f"{url}/health", process.pid, Path(state["logs"]) / f"{name}.log", timeout)
    state["timings_s"][name] = round(time.monotonic() - began, 1)
    say(f"{name:<9} {url} ready in {state['timings_s'][name]}s")


def down(stack_dir: str | os.PathLike | None = None, *, quiet: bool = False) -> bool:
    """Stop the servers, then PostgreSQL; delete the throwaway data directory and stack.json.

    Keeps logs/, mlartifacts/, dvc-remote/. Returns False when there was nothing to stop."""
    stack_dir = resolve_stack_dir(stack_dir)
    if not stack_dir.is_dir():
        if not quiet:
            say(f"no stack in {stack_dir}")
        return False
    with locked(stack_dir):
        return _down(stack_dir, quiet)


def _down(stack_dir: Path, quiet: bool) -> bool:
    state = read_state(stack_dir)
    if state is None:
        if not quiet:
            say(f"no stack in {stack_dir}")
        return False
    services = state.get("services", {})
    for name in ("prefect", "mlflow"):
        if name in services:
            stop_group(services[name].get("pid"), services[name].get("start"))
            if not quiet:
                say(f"{name} stopped")
    pg = services.get("postgres")
    if pg:
        stop_pg(pg, Path(state["logs"]) / "postgres.log")
        remove_pg_root(pg)
        if not quiet:
            say(f"postgres stopped, {pg['data_dir']} removed")
    state_path(stack_dir).unlink(missing_ok=True)
    return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def status(stack_dir: str | os.PathLike | None = None) -> dict:
    """The state plus, per service, whether its process is alive (and the servers healthy)."""
    stack_dir = resolve_stack_dir(stack_dir)
    state = read_state(stack_dir)
    if state is None:
        return {"stack_dir": str(stack_dir), "up": False, "services": {}}
    health = {"prefect": f"{state['urls']['prefect_api']}/health", "mlflow": f"{state['urls']['mlflow']}/health"}
    for name, service in state["services"].items():
        service["alive"] = pid_alive(service.get("pid"), service.get("start"))
        if name in health:
            service["healthy"] = service["alive"] and _healthy(health[name])
    state["up"] = all(s["alive"] and s.get("healthy", True) for s in state["services"].values())
    return state


def env_lines(state: dict) -> list[str]:
    values = {
        "PREFECT_API_URL": state["urls"]["prefect_api"],
        "MLFLOW_TRACKING_URI": state["urls"]["mlflow"],
        "DCML_DVC_REMOTE": state["dvc_remote"],
        "DCML_PG_URL": state["urls"]["pg"],
    }
    return [f"export {key}={shlex.quote(value)}" for key, value in values.items()]


# --------------------------------------------------------------------------- rehearsals


def free_ports(count: int) -> list[int]:
    """``count`` distinct free 127.0.0.1 ports (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(pool: str, names: list[str], env: dict, log_dir: Path, cwd: Path, queue: str = "runs") -> list:
    """Process workers of ``pool`` serving ``queue``, one flow run at a time each (as one per GPU
    would be started), in sessions of their own; output in ``<log_dir>/<name>.log``."""
    prefect = find_program("prefect")
    command = [prefect, "worker", "start", "--pool", pool, "--work-queue", queue, "--limit", "1", "--name"]
    return [spawn([*command, name], Path(log_dir) / f"{name}.log", env, cwd) for name in names]


def stop_workers(workers: list) -> None:
    """Stop workers from :func:`start_workers` (and the flow runs they started)."""
    for worker in workers:
        stop_group(worker.pid, proc_start_time(worker.pid))


# --------------------------------------------------------------------------- CLI

EPILOG = f"""\
commands:
  up      start PostgreSQL, Prefect server, MLflow server (all on {HOST}); returns once all are healthy
  down    stop them, delete the throwaway PostgreSQL data (keeps logs/, mlartifacts/, dvc-remote/)
  status  the state as JSON (exit 0 when up, 3 when not)
  env     export lines for the clients:  eval "$(python scripts/stack.py env)"

defaults: --dir .stack (or ${DIR_ENV}); ports pg {DEFAULT_PORTS["pg"]}, prefect {DEFAULT_PORTS["prefect"]}, \
mlflow {DEFAULT_PORTS["mlflow"]} (or ${PORT_ENV["pg"]}, ${PORT_ENV["prefect"]}, ${PORT_ENV["mlflow"]}).
files: DIR/stack.json (pids, ports, urls, data dir), DIR/logs/<service>.log, DIR/mlartifacts (MLflow's
proxied artifacts), DIR/dvc-remote (a DVC remote folder). This script does not change .dvc/config; to use
the folder:  dvc remote add --local shared "$DCML_DVC_REMOTE"  (then dvc push -r shared).
The dcml pipeline reads MLflow's URL from params.yaml (tracking.mlflow_uri), not from MLFLOW_TRACKING_URI.
As root, PostgreSQL runs as the `{PG_SYSTEM_USER}` system user (runuser); its data lives in DIR/pg, or in a
/tmp/dcml-stack-pg-* folder when that user cannot reach DIR.
exit codes: 0 ok, 1 a service failed (what was started is stopped again), 2 refused (port in use, missing
program), 3 (status/env) not up."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stack.py",
        description="The shared stack of a multi-worker setup: PostgreSQL + Prefect server + MLflow server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("--dir", help=f"stack directory (default: ${DIR_ENV} or ./{DEFAULT_DIR})")
    for name in DEFAULT_PORTS:
        parser.add_argument(f"--{name}-port", type=int, help=f"default: ${PORT_ENV[name]} or {DEFAULT_PORTS[name]}")
    return parser.parse_args(argv)


def _cli_up(args: argparse.Namespace) -> int:
    state = up(args.dir, args.pg_port, args.prefect_port, args.mlflow_port)
    if state.get("already_up"):
        say(f"already up in {state['stack_dir']} (pids {[s['pid'] for s in state['services'].values()]})")
    else:
        say(f"up in {state['timings_s']['total']}s; logs in {state['logs']}")
    print("\n".join(env_lines(state)))
    return 0


def _cli_env(args: argparse.Namespace) -> int:
    state = status(args.dir)
    if not state["up"]:
        say(f"the stack in {state['stack_dir']} is not up: run `python scripts/stack.py up` (or `make up`)")
        return 3
    print("\n".join(env_lines(state)))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.update(TELEMETRY_OFF)
    args = parse_args(argv)
    try:
        if args.command == "up":
            return _cli_up(args)
        if args.command == "down":
            down(args.dir)
            return 0
        if args.command == "status":
            state = status(args.dir)
            print(json.dumps(state, indent=2, sort_keys=True))
            return 0 if state["up"] else 3
        return _cli_env(args)
    except StackError as error:
        say(f"error: {error}")
        if error.log_tail:
            print(error.log_tail, file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
