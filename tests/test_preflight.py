"""Config and environment errors are caught in preflight: one message naming the key or
file, exit status 2, before Prefect starts its server (issue 8, "Input checks")."""

import dataclasses

import pytest
import yaml

from dcml.config import SEED_LIMIT, ConfigError, load_params, params_from_dict, to_dict
from flows.cli import main
from tests.conftest import REPO_ROOT, shrink


class ServerStarted(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """Any start of Prefect's server (the temporary one every flow call starts) fails the test."""
    from prefect.server.api import server

    def start(self, timeout=None):
        raise ServerStarted("a Prefect server was started")

    monkeypatch.setattr(server.SubprocessASGIServer, "start", start)


@pytest.fixture()
def params_file(tmp_path, tiny_demo_root):
    def write(raw_changes=None, **changes):
        params = shrink(load_params(REPO_ROOT / "params.yaml"), tiny_demo_root)
        raw = to_dict(dataclasses.replace(params, **changes))
        for key, value in (raw_changes or {}).items():
            *parents, leaf = key.split(".")
            node = raw
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


def fails(argv, capsys, tmp_path, *expected):
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dcml: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_k_zero(command, tmp_path, params_file, capsys):
    fails([command, "--params", params_file(), "-k", "0"], capsys, tmp_path, "cluster.num_learners (-k) must be >= 1")


def test_sweep_num_learners_zero_in_params(tmp_path, params_file, capsys):
    path = params_file({"sweep.num_learners": [0, 4]})
    fails(["sweep", "--params", path], capsys, tmp_path, "sweep.num_learners: 0 must be >= 1")


@pytest.mark.parametrize("seed", [-5, 2**31, 2**40])
def test_seed_out_of_range_in_params(seed, tmp_path, params_file, capsys):
    fails(["train", "--params", params_file(seed=seed)], capsys, tmp_path, "seed must be in [0, 2**31)", str(seed))


@pytest.mark.parametrize(
    "argv",
    [["train", "--seed", "-5"], ["train", "--seed", str(2**40)], ["sweep", "--seeds", "0", str(2**31)]],
)
def test_seed_out_of_range_on_the_command_line(argv, tmp_path, params_file, capsys):
    fails([argv[0], "--params", params_file(), *argv[1:]], capsys, tmp_path, "seed must be in [0, 2**31)")


def test_sweep_seeds_out_of_range_in_params(tmp_path, params_file, capsys):
    fails(["sweep", "--params", params_file({"sweep.seeds": [0, -1]})], capsys, tmp_path, "sweep.seeds: -1")


def test_seed_bounds():
    raw = to_dict(load_params(REPO_ROOT / "params.yaml"))
    assert params_from_dict({**raw, "seed": SEED_LIMIT - 1}).seed == 2**31 - 1
    assert params_from_dict({**raw, "seed": 0}).seed == 0
    with pytest.raises(ConfigError, match="seed must be"):
        params_from_dict({**raw, "seed": SEED_LIMIT})


def test_seed_limit_is_what_faiss_and_numpy_accept():
    import faiss
    import numpy as np

    faiss.ClusteringParameters().seed = SEED_LIMIT - 1
    with pytest.raises(OverflowError):
        faiss.ClusteringParameters().seed = SEED_LIMIT
    np.random.default_rng([0, 0])
    with pytest.raises(ValueError):
        np.random.default_rng([-1, 0])


def test_cuda_requested_but_absent(tmp_path, params_file, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = load_params(params_file())
    path = params_file(train=dataclasses.replace(params.train, device="cuda"))
    fails(["train", "--params", path], capsys, tmp_path, "train.device is 'cuda' but no CUDA device")


def test_missing_weights_file(tmp_path, params_file, capsys):
    params = load_params(params_file())
    path = params_file(model=dataclasses.replace(params.model, pretrained=str(tmp_path / "nowhere.pth")))
    fails(["sweep", "--params", path], capsys, tmp_path, "model.pretrained: weights file not found", "nowhere.pth")


def test_unknown_tracking_scheme(tmp_path, params_file, capsys):
    path = params_file({"tracking.mlflow_uri": "foo://host/x"})
    fails(["train", "--params", path], capsys, tmp_path, "tracking.mlflow_uri", "foo://host/x", "sqlite")


def test_unknown_tracking_scheme_hides_credentials(tmp_path, params_file, capsys):
    path = params_file({"tracking.mlflow_uri": "foo://user:secret@host/x"})
    fails(["train", "--params", path], capsys, tmp_path, "tracking.mlflow_uri", "foo://***@host/x")


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/mlflow.db",
        "postgresql://user:pw@db:5432/mlflow",
        "postgresql+psycopg2://db/mlflow",
        "mysql://db/mlflow",
        "mysql+pymysql://db/mlflow",
        "http://127.0.0.1:5000",
        "https://user:pw@mlflow.example.org",
        "databricks",
        "databricks://profile",
    ],
)
def test_tracking_uris_mlflow_accepts(uri):
    from tasks.tracking import check_tracking_uri

    check_tracking_uri(uri)


@pytest.mark.parametrize("uri", ["mlruns", "/abs/mlruns", "file:///abs/mlruns"])
def test_file_store_uris_need_mlflows_opt_in(uri, monkeypatch):
    from tasks.tracking import check_tracking_uri

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE"):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(uri)


def test_yaml_syntax_error(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 0\ndata: {root: [unclosed\n")
    fails(["sweep", "--params", str(path)], capsys, tmp_path, "broken.yaml", "not valid YAML")
    fails(["train", "--params", str(path)], capsys, tmp_path, "broken.yaml", "not valid YAML")


def test_valid_params_pass_preflight(tmp_path, params_file):
    from tasks.runs import preflight

    params = preflight(params_file(), [(1, 0), (4, 2**31 - 1)], str(tmp_path / "out"))
    assert params.tracking.mlflow_uri == "sqlite:///:memory:"


def test_a_valid_command_gets_as_far_as_the_server(tmp_path, params_file):
    """The check above is real: with valid params, the same call starts Prefect's server."""
    with pytest.raises(ServerStarted):
        main(["train", "--params", params_file(), "--out", str(tmp_path / "out")])


# --- scale-out options (docs/scaling.md) ---------------------------------------------------


def test_more_processes_than_gpus(tmp_path, params_file, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = params_file({"train.device": "cuda", "train.nproc_per_node": 2})
    fails(["train", "--params", path], capsys, tmp_path, "train.nproc_per_node is 2", "1 CUDA device")


def test_workers_need_a_prefect_server(tmp_path, params_file, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    fails(
        ["sweep", "--deployment", "--params", params_file()], capsys, tmp_path, "--deployment needs", "PREFECT_API_URL"
    )


def test_workers_name_an_unreachable_server(tmp_path, params_file, capsys):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        fails(["sweep", "--deployment", "--params", params_file()], capsys, tmp_path, "does not answer", str(port))
        # the deprecated spelling still works, and says so
        assert main(["sweep", "--workers", "--params", params_file(), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "--workers is deprecated" in err and "does not answer" in err


def test_workers_and_concurrent_exclude_each_other(tmp_path, params_file, capsys):
    fails(["sweep", "--deployment", "--concurrent", "--params", params_file()], capsys, tmp_path, "choose one")


def test_concurrency_without_workers(tmp_path, params_file, capsys):
    fails(["deploy", "--concurrency", "2", "--params", params_file()], capsys, tmp_path, "add --workers")


def test_fit_refuses_data_parallel_params(tiny_params):
    from dcml.fit import fit

    params = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, nproc_per_node=2))
    with pytest.raises(ConfigError, match="dcml train"):
        fit(params, None, None)
