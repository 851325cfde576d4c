"""PNG plots (matplotlib, Agg backend): nothing here needs a browser or a CDN."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dcml.atomic import atomic_path  # noqa: E402
from tasks.stats import describe  # noqa: E402


def _save(figure: plt.Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def recall_curve(evaluations: Sequence[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """R@k against epoch, one line per k; ``evaluations`` rows have ``epoch`` and ``recall@k`` keys."""
    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in evaluations]
    keys = sorted({k for row in evaluations for k in row if k.startswith("recall@")}, key=lambda k: int(k[7:]))
    for key in keys:
        axis.plot(epochs, [100 * row[key] for row in evaluations], marker="o", label=key.replace("recall", "R"))
    axis.set(xlabel="epoch", ylabel="recall (%)", title=title or "test recall@k")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)


def cluster_sizes(divisions: Sequence[tuple[int, np.ndarray]], path: str | Path) -> Path:
    """Stacked bars of each learner's image count at every division ``(epoch, sizes (K,))``."""
    figure, axis = plt.subplots(figsize=(6, 4))
    if divisions:
        epochs = [str(epoch) for epoch, _ in divisions]
        # (divisions, K); a hierarchical division has fewer clusters at first: padded with 0
        width = max(len(s) for _, s in divisions)
        sizes = np.stack([np.pad(s, (0, width - len(s))) for _, s in divisions])
        bottom = np.zeros(len(divisions))
        for learner in range(sizes.shape[1]):
            axis.bar(epochs, sizes[:, learner], bottom=bottom, label=f"learner {learner}")
            bottom += sizes[:, learner]
        axis.legend(fontsize="small")
    else:  # K=1: the baseline never divides its data
        axis.text(0.5, 0.5, "K=1: one learner on all data\n(no divisions)", ha="center", va="center")
        axis.set_xticks([])
    axis.set(xlabel="division at epoch", ylabel="images", title="cluster sizes over time")
    return _save(figure, path)


def retrieval_grid(
    query_paths: Sequence[str],
    neighbour_paths: Sequence[Sequence[str]],
    correct: np.ndarray,
    path: str | Path,
    thumb: int = 64,
) -> Path:
    """One row per query: the query, then its nearest neighbours framed green (same class) or red."""
    rows, cols = len(query_paths), 1 + max(len(n) for n in neighbour_paths)
    figure, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for r, (query, neighbours) in enumerate(zip(query_paths, neighbour_paths, strict=True)):
        for c, image_path in enumerate([query, *neighbours]):
            axis = axes[r][c]
            axis.imshow(Image.open(image_path).convert("RGB").resize((thumb, thumb)))
            axis.set_xticks([])
            axis.set_yticks([])
            colour = "black" if c == 0 else ("green" if correct[r, c - 1] else "red")
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
        axes[r][0].set_ylabel("query", fontsize="small")
    return _save(figure, path)


def recall_vs_k(rows: Sequence[dict[str, Any]], path: str | Path, key: str = "recall@1") -> Path:
    """Final ``key`` against K, one line per variant family (mean ± sample std over seeds).

    Rows have ``num_learners``, ``key`` and optionally ``variant`` (``tasks.report.variant_label``,
    e.g. ``K=4 masks``); the family is the variant without ``K=<k>`` (``slices`` when
    nothing is left). K=1, the baseline, is the first point of every family.
    """
    points: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        k = int(row["num_learners"])
        family = str(row.get("variant", f"K={k}")).removeprefix(f"K={k}").strip() or "slices"
        points.setdefault("" if k == 1 else family, {}).setdefault(k, []).append(100 * row[key])
    baseline = points.pop("", {})
    names = sorted(points, key=lambda name: (name != "slices", name))  # slices (CVPR'19) first
    families = {name: {**baseline, **points[name]} for name in names} or {"K=1": baseline}
    ks = sorted({k for by_k in families.values() for k in by_k})
    figure, axis = plt.subplots(figsize=(5, 4))
    for offset, (name, by_k) in enumerate(families.items()):
        xs = sorted(by_k)
        described = [describe(by_k[k]) for k in xs]
        axis.errorbar(
            [ks.index(k) + 0.06 * (offset - (len(families) - 1) / 2) for k in xs],
            [d["mean"] for d in described],
            yerr=[d["std"] or 0.0 for d in described],
            marker="o",
            capsize=4,
            label=name,
        )
    one_seed = any(len(values) == 1 for by_k in families.values() for values in by_k.values())
    title = f"{key} vs K (mean ± std over seeds)" + ("\n1 seed: no error bars" if one_seed else "")
    axis.set_xticks(range(len(ks)), [str(k) for k in ks])
    axis.set(xlabel="K (learners)", ylabel=key.replace("recall", "R") + " (%)", title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, path)


def recall_vs_epoch(curves: dict[str, Sequence[dict[str, float]]], path: str | Path, key: str = "recall@1") -> Path:
    """``key`` against epoch, one line per run label (e.g. ``K=4 seed=0``)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, evaluations in curves.items():
        axis.plot([r["epoch"] for r in evaluations], [100 * r[key] for r in evaluations], marker="o", label=label)
    axis.set(xlabel="epoch", ylabel=key.replace("recall", "R") + " (%)", title=f"{key} vs epoch per K")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, path)
