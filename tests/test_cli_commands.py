"""dcml --version, dcml runs, dcml data inspect --dataset folder, deprecated spellings."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from tasks.layout import RunLayout


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("dcml ")


def test_inspect_folder_dataset(tiny_demo_root, capsys):
    assert main(["data", "inspect", "--dataset", "folder", "--root", str(tiny_demo_root), "--params", "none.yaml"]) == 0
    report = json.loads(capsys.readouterr().out)
    classes = sorted(p.name for p in tiny_demo_root.iterdir() if p.is_dir())
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert train["classes"] + test["classes"] == len(classes) and test["classes_shared_with_train"] == 0
    assert train["images"] + test["images"] == sum(1 for _ in tiny_demo_root.rglob("*.png"))


def test_runs_lists_state_epoch_and_recall(tmp_path, tiny_params, capsys):
    import yaml

    from dcml.config import to_dict, with_num_learners
    from tasks import io

    runs = tmp_path / "out" / "runs"
    finished, stopped = RunLayout(runs / "K4-seed1-aaaa0000"), RunLayout(runs / "K1-seed0-bbbb0000")
    for layout, k, seed in ((finished, 4, 1), (stopped, 1, 0)):
        layout.root.mkdir(parents=True)
        layout.params.write_text(yaml.safe_dump(to_dict(with_num_learners(tiny_params, k, seed))))
        layout.checkpoint(2).parent.mkdir()
        layout.checkpoint(2).write_bytes(b"")
        io.write_json(layout.evaluation(2), {"recall@1": 0.25})
    io.write_json(finished.final_metrics, {"recall@1": 0.5})
    assert main(["runs", "--out", str(tmp_path / "out"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["K"], r["seed"], r["state"], r["epoch"], r["recall@1"]) for r in rows] == [
        (1, 0, "stopped", 2, 0.25),
        (4, 1, "finished", 2, 0.5),
    ]
    assert rows[1]["variant"] == "K=4" and rows[1]["folder"] == str(finished.root)
    assert main(["runs", "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["K", "seed", "variant", "epoch", "state", "R@1"] and "50.00" in table[2]


def test_compare_reads_runs_from_one_folder_and_writes_to_another(tmp_path, capsys):
    assert main(["compare", "--runs", str(tmp_path), "x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compare", "--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err
