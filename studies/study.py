"""Run a K study: K=1 vs K>1 (CVPR'19 slices) vs K>1 (TPAMI'21 masks + hierarchical), several seeds.

A study file (``studies/*.yaml``) names the seeds, K, the keys it changes in params.yaml
and one set of keys per variant. For every variant this writes ``OUT/params-<variant>.yaml``
(params.yaml < study params < variant) and runs ``dcml sweep`` on it into the same OUT with
the default of keeping other runs; the K=1 baseline has the same params in every variant (see
``dcml.config.with_num_learners``), so it is trained once and reused. Then ``dcml compare``
writes one table over all runs: mean ± std per variant and the paired difference to K=1
with its 95 % t-interval (``OUT/comparison.md``, ``OUT/summary.csv``, ``OUT/metrics.json``).

    python studies/study.py studies/demo.yaml --out outputs/study-demo
    python studies/study.py studies/omniglot.yaml --out outputs/study-omniglot --data-root data/omniglot

Reruns continue: finished runs are reused, interrupted ones resume from their checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dcml.config import ConfigError, apply_preset, params_from_dict

ROOT = Path(__file__).resolve().parent.parent


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def variant_params(study: dict[str, Any], variant: str, data_root: str | None) -> dict[str, Any]:
    """params.yaml < the study's ``params`` < the variant's keys (< ``--data-root``)."""
    base = yaml.safe_load((ROOT / study.get("base", "params.yaml")).read_text())
    raw = merge(merge(base, study.get("params") or {}), study["variants"][variant] or {})
    if data_root is not None:
        raw["data"]["root"] = data_root
    params_from_dict(apply_preset(raw))  # every key checked before anything runs
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study file, e.g. studies/omniglot.yaml")
    parser.add_argument("--out", required=True, help="output folder shared by all variants")
    parser.add_argument("--data-root", help="overrides data.root (where the dataset is)")
    parser.add_argument("--seeds", type=int, nargs="+", help="overrides the study's seeds")
    parser.add_argument("--variants", nargs="+", help="run only these variants (default: all)")
    args = parser.parse_args(argv)

    study = yaml.safe_load(Path(args.study).read_text())
    seeds = [str(s) for s in (args.seeds or study["seeds"])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        files = {}
        for variant in args.variants or list(study["variants"]):
            files[variant] = out / f"params-{variant}.yaml"
            files[variant].write_text(yaml.safe_dump(variant_params(study, variant, args.data_root), sort_keys=False))
    except (ConfigError, KeyError) as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2
    timings = {}
    for variant, params_file in files.items():
        command = [sys.executable, "-m", "flows.cli", "sweep", "--params", str(params_file), "--out", str(out)]
        command += ["-k", *map(str, study["num_learners"]), "--seeds", *seeds]
        print("study:", " ".join(command), file=sys.stderr, flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL)
        timings[variant] = round(time.perf_counter() - start, 1)
        if result.returncode:
            return result.returncode
    compare = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "--out", str(out)], cwd=ROOT)
    print(f"study: wall seconds per variant {timings}; table: {out / 'comparison.md'}", file=sys.stderr)
    return compare.returncode


if __name__ == "__main__":
    sys.exit(main())
