"""Credentials in ``tracking.mlflow_uri`` never reach what dcml writes or prints; the
connection still uses them (issue 8, "Secrets")."""

import dataclasses
import json

import pytest
import torch
import yaml

from dcml.checkpoint import load_checkpoint
from dcml.config import Params, flatten, redact_uri, split_uri_credentials, to_dict

SECRET_URI = "http://alice:s3cr%40t@127.0.0.1:5000"
PASSWORD = "s3cr"  # the part of the password before the percent-encoded "@"


def with_uri(params: Params, uri: str) -> Params:
    return dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, mlflow_uri=uri))


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        ("http://user:password@host:5000", "http://***@host:5000"),
        ("https://token@mlflow.example.org/path?q=1", "https://***@mlflow.example.org/path?q=1"),
        ("postgresql://user:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("http://host:5000", "http://host:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("sqlite:////data/a@b/mlflow.db", "sqlite:////data/a@b/mlflow.db"),  # an @ in a path is no credential
        ("databricks", "databricks"),
        ("mlruns", "mlruns"),
    ],
)
def test_redact_uri(uri, redacted):
    assert redact_uri(uri) == redacted


def test_split_uri_credentials_decodes():
    assert split_uri_credentials(SECRET_URI) == ("http://127.0.0.1:5000", "alice", "s3cr@t")
    assert split_uri_credentials("http://h:1") == ("http://h:1", None, None)


def test_serialised_params_hold_no_password(tiny_params):
    params = with_uri(tiny_params, SECRET_URI)
    assert to_dict(params)["tracking"]["mlflow_uri"] == "http://***@127.0.0.1:5000"
    assert PASSWORD not in json.dumps(flatten(params))
    assert to_dict(tiny_params) == to_dict(with_uri(tiny_params, tiny_params.tracking.mlflow_uri))  # plain: as is


def test_run_key_ignores_credentials(tiny_params):
    from tasks.runs import run_key

    keys = {run_key(with_uri(tiny_params, uri)) for uri in (SECRET_URI, "http://127.0.0.1:5000", "sqlite:///x.db")}
    assert len(keys) == 1


def test_run_params_file_and_checkpoint_hold_no_password(tmp_path, tiny_params):
    from dcml.trainer import Trainer
    from tasks.layout import RunLayout
    from tasks.runs import write_run_params

    params = with_uri(tiny_params, SECRET_URI)
    layout = RunLayout(tmp_path / "runs" / "K4-seed0-x")
    write_run_params(params, layout)
    write_run_params(params, layout)  # a rerun: the stored params still match
    assert PASSWORD not in layout.params.read_text()
    assert yaml.safe_load(layout.params.read_text())["tracking"]["mlflow_uri"] == "http://***@127.0.0.1:5000"

    trainer = Trainer.create(params, 56, torch.device("cpu"))
    path = trainer.save(tmp_path / "epoch-0000.pt")
    assert PASSWORD.encode() not in path.read_bytes()
    assert load_checkpoint(path)["config"]["tracking"]["mlflow_uri"] == "http://***@127.0.0.1:5000"
    assert Trainer.for_inference(path, torch.device("cpu")).params.tracking.mlflow_uri == "http://***@127.0.0.1:5000"


def test_tracking_state_and_mlflow_params_hold_no_password(tmp_path, tiny_params, monkeypatch):
    """The tracking tasks with a credentialed URI, on a local store: what they write."""
    from mlflow.tracking import MlflowClient

    from tasks import tracking

    local = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(tracking, "client", lambda params: local)
    params = with_uri(tiny_params, SECRET_URI)
    state = tmp_path / ".tracking" / "K4-seed0.json"
    run_id = tracking.start_run.fn(params, "K4-seed0", str(state))
    assert PASSWORD not in state.read_text()
    assert json.loads(state.read_text())["tracking_uri"] == "http://***@127.0.0.1:5000"
    logged = local.get_run(run_id).data.params
    assert logged["tracking.mlflow_uri"] == "http://***@127.0.0.1:5000"
    assert PASSWORD not in json.dumps(logged)
    assert tracking.start_run.fn(params, "K4-seed0", str(state)) == run_id  # the state still matches: reopened


def test_mlflow_gets_the_credentials_apart_from_the_uri(tiny_params, monkeypatch):
    """MLflow prints "View run ... at <host>" with the host of its credentials: the bare URI."""
    from tasks import tracking

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    params = with_uri(tiny_params, SECRET_URI)
    assert tracking.connection_uri(params) == "http://127.0.0.1:5000"
    creds = tracking.client(params)._tracking_client.store.get_host_creds()
    assert (creds.host, creds.username, creds.password) == ("http://127.0.0.1:5000", "alice", "s3cr@t")
    assert tracking.connection_uri(with_uri(tiny_params, "sqlite:///x.db")) == "sqlite:///x.db"
