"""How much data the learners keep across divisions, per variant: a Markdown table.

For every finished K>1 run under ``OUT/runs``: per division (after the first) the NMI to
the previous division and ``learner_kept`` — the fraction of training images whose learner
(or its parent, after a hierarchical split) is unchanged — averaged over the run's
divisions, then mean ± std over seeds per variant; plus the cluster-size entropy.

    python studies/divisions.py outputs/study-demo
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tasks import io
from tasks.layout import RunLayout
from tasks.report import variant_label
from tasks.runs import run_params

KEYS = ("nmi_to_previous", "learner_kept", "size_entropy", "images_dropped")


def run_means(folder: Path) -> dict[str, float]:
    stats = [io.read_division(p).stats for p in sorted((folder / "divisions").glob("division-epoch-*.parquet"))]
    return {key: float(np.mean([s[key] for s in stats if key in s])) for key in KEYS if any(key in s for s in stats)}


def main(out: str) -> None:
    by_variant: dict[str, list[dict[str, float]]] = {}
    for folder in sorted((Path(out) / "runs").iterdir()):
        if not RunLayout(folder).final_metrics.is_file():
            continue
        params = run_params(RunLayout(folder))
        if params.cluster.num_learners > 1:
            by_variant.setdefault(variant_label(params), []).append(run_means(folder))
    print("| variant | runs | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for variant, runs in by_variant.items():
        cells = []
        for key in KEYS:
            values = [r[key] for r in runs if key in r]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.3f}")
        print(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
