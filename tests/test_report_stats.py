"""Seeds as an axis of the K comparison: statistics, variant labels, outputs, `dcml compare`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from scipy import stats as scipy_stats

from dcml.config import ConfigError, load_params, to_dict, with_num_learners
from flows.cli import main
from tasks import io, stats
from tasks.report import NO_INTERVAL, compare_runs, variant_label
from tests.conftest import REPO_ROOT

# three seeds with known values: K=4 − K=1 per seed is +0.03, +0.04, +0.01
BASELINE = {0: 0.50, 1: 0.52, 2: 0.54}
SLICES = {0: 0.53, 1: 0.56, 2: 0.55}
MASKS = {0: 0.49, 1: 0.50, 2: 0.56}


def params_of(k: int, seed: int, learners: str = "slices", hierarchical: bool = False):
    params = load_params(REPO_ROOT / "params.yaml")
    params = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, learners=learners, embedding_dim=64),
        cluster=dataclasses.replace(params.cluster, hierarchical=hierarchical),
    )
    return with_num_learners(params, k, seed)


def write_run(runs: Path, k: int, seed: int, recall: float, learners: str = "slices", finished: bool = True) -> Path:
    """A run folder as a finished run leaves it: params.yaml, history, metrics.json."""
    folder = runs / f"K{k}-seed{seed}-{learners}"
    (folder / "history").mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(to_dict(params_of(k, seed, learners))))
    final = {"epoch": 3, "recall@1": recall, "recall@2": min(1.0, recall + 0.1), "nmi": 0.6 + seed / 100}
    io.write_json(folder / "history" / "eval-epoch-0003.json", final)
    if finished:
        io.write_json(folder / "metrics.json", {**final, "num_learners": k, "seed": seed, "train_seconds": 1.0})
    return folder


def test_mean_std_and_paired_interval_match_a_hand_computation():
    diffs = [SLICES[s] - BASELINE[s] for s in (0, 1, 2)]  # 0.03, 0.04, 0.01
    mean = (0.03 + 0.04 + 0.01) / 3
    sd = math.sqrt(((0.03 - mean) ** 2 + (0.04 - mean) ** 2 + (0.01 - mean) ** 2) / 2)
    low, high = scipy_stats.t.interval(0.95, 2, loc=mean, scale=sd / math.sqrt(3))

    described = stats.describe(list(BASELINE.values()))
    assert described["mean"] == pytest.approx(0.52) and described["std"] == pytest.approx(0.02) and described["n"] == 3
    result = stats.paired_difference(SLICES, BASELINE)
    assert result["n"] == 3 and result["diff"] == pytest.approx(mean) and result["std"] == pytest.approx(sd)
    assert result["ci_low"] == pytest.approx(low) and result["ci_high"] == pytest.approx(high)
    # t(0.975, 2) = 4.3027: the interval is far wider than ±1.96 sd/√n
    assert result["ci_high"] - mean == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)
    assert diffs == pytest.approx([0.03, 0.04, 0.01])


def test_one_seed_has_no_std_and_no_interval():
    assert stats.describe([0.5]) == {"mean": 0.5, "std": None, "n": 1}
    result = stats.paired_difference({0: 0.6}, {0: 0.5})
    assert result["diff"] == pytest.approx(0.1) and result["n"] == 1
    assert result["std"] is None and result["ci_low"] is None and result["ci_high"] is None


def test_pairing_is_by_seed_and_skips_seeds_missing_in_the_baseline():
    variant = {0: 0.60, 1: 0.70, 2: 0.10}  # seed 2 has no K=1 run: must not be paired
    baseline = {0: 0.50, 1: 0.50, 3: 0.90}
    result = stats.paired_difference(variant, baseline)
    assert result["n"] == 2 and result["diff"] == pytest.approx(0.15)
    assert result["std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    summary = stats.summarize(
        {
            "K=1": {s: {"recall@1": v} for s, v in baseline.items()},
            "K=4": {s: {"recall@1": v} for s, v in variant.items()},
        }
    )
    assert summary["summary"]["K=4"]["recall@1"]["n"] == 3  # the mean uses every seed of the variant
    assert summary["summary"]["K=4"]["recall@1"]["mean"] == pytest.approx(1.4 / 3)
    assert summary["vs_K1"]["K=4"]["recall@1"]["n"] == 2 and "K=1" not in summary["vs_K1"]


def test_variant_labels():
    assert variant_label(params_of(1, 0)) == "K=1"
    assert variant_label(params_of(1, 0, "masks", hierarchical=True)) == "K=1"  # the baseline is one run
    assert variant_label(params_of(4, 0)) == "K=4"
    assert variant_label(params_of(4, 0, "masks")) == "K=4 masks"
    assert variant_label(params_of(2, 0, hierarchical=True)) == "K=2 hierarchical"
    assert variant_label(params_of(4, 0, "masks", hierarchical=True)) == "K=4 masks hierarchical"
    backbone = params_of(4, 0, "masks", hierarchical=True)
    backbone = dataclasses.replace(backbone, cluster=dataclasses.replace(backbone.cluster, space="backbone"))
    assert variant_label(backbone) == "K=4 masks hierarchical backbone-clustered"


def test_comparison_outputs_summary_and_paired_differences(tmp_path):
    runs = tmp_path / "runs"
    run_dirs = {}
    for seed in (0, 1, 2):
        run_dirs[f"K1-seed{seed}"] = str(write_run(runs, 1, seed, BASELINE[seed]))
        run_dirs[f"K4-seed{seed}"] = str(write_run(runs, 4, seed, SLICES[seed]))
    compare_runs.fn(str(tmp_path), run_dirs)

    metrics = io.read_json(tmp_path / "metrics.json")
    assert metrics["K4-seed1"]["recall@1"] == 0.56  # per-run entries stay
    assert metrics["summary"]["K=1"]["recall@1"] == {"mean": 0.52, "std": 0.02, "n": 3}
    versus = metrics["vs_K1"]["K=4"]["recall@1"]
    mean = (0.03 + 0.04 + 0.01) / 3
    low, high = scipy_stats.t.interval(0.95, 2, loc=mean, scale=stats.describe([0.03, 0.04, 0.01])["std"] / 3**0.5)
    assert versus["n"] == 3 and versus["diff"] == round(mean, 5)
    assert versus["ci_low"] == round(low, 5) and versus["ci_high"] == round(high, 5)
    assert set(metrics["vs_K1"]) == {"K=4"}

    markdown = (tmp_path / "comparison.md").read_text()
    assert "| K4-seed1 | 4 | 1 | K=4 |" in markdown  # the per-run table
    assert "| K=1 | 3 | 52.00 ± 2.00 |" in markdown
    assert f"| K=4 | 3 | +2.67 [{100 * low:+.2f}, {100 * high:+.2f}]".replace("-", "\N{MINUS SIGN}") in markdown
    assert NO_INTERVAL not in markdown

    rows = (tmp_path / "summary.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[0] for r in rows[1:]] == ["K=1", "K=4"]
    k4 = dict(zip(header, rows[2].split(","), strict=True))
    assert float(k4["recall@1_diff_vs_K1"]) == round(mean, 5) and k4["recall@1_n_paired"] == "3"
    assert float(k4["recall@1_ci_low"]) == round(low, 5)
    assert (tmp_path / "plots" / "recall_vs_k.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_says_so_in_markdown_and_json(tmp_path):
    runs = tmp_path / "runs"
    run_dirs = {"K1-seed0": str(write_run(runs, 1, 0, 0.5)), "K4-seed0": str(write_run(runs, 4, 0, 0.6))}
    compare_runs.fn(str(tmp_path), run_dirs)
    metrics = io.read_json(tmp_path / "metrics.json")
    assert metrics["summary"]["K=4"]["recall@1"] == {"mean": 0.6, "std": None, "n": 1}
    assert metrics["vs_K1"]["K=4"]["recall@1"] == {"diff": 0.1, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    markdown = (tmp_path / "comparison.md").read_text()
    assert NO_INTERVAL in markdown and "+10.00 (no interval)" in markdown


def test_dcml_compare_two_variants_into_one_table(tmp_path, capsys):
    runs = tmp_path / "out" / "runs"
    for seed in (0, 1, 2):  # a CVPR-slices sweep and a TPAMI-masks sweep kept in one folder
        write_run(runs, 1, seed, BASELINE[seed])
        write_run(runs, 4, seed, SLICES[seed])
        write_run(runs, 4, seed, MASKS[seed], learners="masks")
    write_run(runs, 8, 0, 0.99, finished=False)  # unfinished: left out

    assert main(["compare", "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    metrics = io.read_json(tmp_path / "out" / "metrics.json")
    assert set(metrics["summary"]) == {"K=1", "K=4", "K=4 masks"}
    assert metrics["vs_K1"]["K=4 masks"]["recall@1"]["n"] == 3
    assert metrics["vs_K1"]["K=4 masks"]["recall@1"]["diff"] == pytest.approx((-0.01 - 0.02 + 0.02) / 3, abs=1e-5)
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert markdown.count("| K=4 masks | 3 |") == 2  # summary and difference table
    assert "K8-seed0" not in markdown and "| K4-seed2-masks | 4 | 2 | K=4 masks |" in markdown


def test_dcml_compare_given_folders(tmp_path, capsys):
    runs = tmp_path / "runs"
    folders = [write_run(runs, 1, 0, 0.5), write_run(runs, 4, 0, 0.6), write_run(runs, 4, 1, 0.7)]
    assert main(["compare", "--out", str(tmp_path / "report"), *map(str, folders)]) == 0
    capsys.readouterr()
    metrics = io.read_json(tmp_path / "report" / "metrics.json")
    assert metrics["summary"]["K=4"]["recall@1"]["n"] == 2 and metrics["vs_K1"]["K=4"]["recall@1"]["n"] == 1


def test_dcml_compare_on_an_empty_folder_exits_2(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path)]) == 2
    assert "no finished runs under" in capsys.readouterr().err
    assert not (tmp_path / "comparison.md").exists()


def test_dcml_compare_a_folder_without_metrics_exits_2(tmp_path, capsys):
    unfinished = write_run(tmp_path / "runs", 4, 0, 0.6, finished=False)
    assert main(["compare", "--out", str(tmp_path), str(unfinished)]) == 2
    assert "no final metrics" in capsys.readouterr().err


def test_two_runs_of_one_variant_and_seed_are_refused(tmp_path):
    run_dirs = {"a": str(write_run(tmp_path / "a", 4, 0, 0.6)), "b": str(write_run(tmp_path / "b", 4, 0, 0.7))}
    with pytest.raises(ConfigError, match="two runs of variant 'K=4' with seed 0"):
        compare_runs.fn(str(tmp_path), run_dirs)


def test_log_summary_on_the_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = params_of(4, 0)
    params = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, mlflow_uri=uri))
    state = tmp_path / "sweep.json"
    run_id = tracking.start_run.fn(params, "sweep", str(state))
    groups = {
        "K=1": {0: {"recall@1": 0.50}, 1: {"recall@1": 0.52}},
        "K=4": {0: {"recall@1": 0.60}},
        "K=4 masks hierarchical": {0: {"recall@1": 0.53}, 1: {"recall@1": 0.56}},
    }
    summary = stats.summarize(groups)
    tracking.log_summary.fn(params, run_id, summary, str(state))
    tracking.log_summary.fn(params, run_id, summary, str(state))  # a retried task logs nothing twice
    client = MlflowClient(uri)
    logged = client.get_run(run_id).data.metrics
    assert logged["K1/recall_at_1_mean"] == pytest.approx(0.51)
    assert logged["K4_masks_hierarchical/recall_at_1_diff_vs_K1"] == pytest.approx(0.035)
    low, high = scipy_stats.t.interval(0.95, 1, loc=0.035, scale=stats.describe([0.03, 0.04])["std"] / 2**0.5)
    assert logged["K4_masks_hierarchical/recall_at_1_ci_low"] == pytest.approx(low)
    assert logged["K4_masks_hierarchical/recall_at_1_ci_high"] == pytest.approx(high)
    assert logged["K4/recall_at_1_diff_vs_K1"] == pytest.approx(0.1)
    assert "K4/recall_at_1_std" not in logged and "K4/recall_at_1_ci_low" not in logged  # one seed
    assert "K1/recall_at_1_diff_vs_K1" not in logged
    assert len(client.get_metric_history(run_id, "K1/recall_at_1_mean")) == 1
