"""Every benchmark runs through the same method by changing params only (miniature copies)."""

import dataclasses

import pytest
import torch

from dcml.config import load_params, validate
from dcml.data import build_bundle, load_splits
from dcml.fit import fit
from tests.conftest import REPO_ROOT
from tests.data import fake_benchmarks


@pytest.mark.parametrize("variant", ["cvpr", "tpami"])
@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "inshop", "vehicleid"])
def test_fit_runs_on_each_benchmark_layout(tmp_path, name, variant):
    getattr(fake_benchmarks, f"make_{name}")(tmp_path / name)
    base = load_params(REPO_ROOT / "params.yaml")
    r = dataclasses.replace
    params = r(
        base,
        data=r(base.data, dataset=name, root=str(tmp_path / name), image_size=16, resize_size=18),
        model=r(base.model, embedding_dim=16, learners="masks" if variant == "tpami" else "slices"),
        train=r(base.train, epochs=1 if variant == "cvpr" else 2, batch_size=8, images_per_class=2, device="cpu"),
        # tpami: 1 then 2 clusters (hierarchical), re-clustering every epoch
        cluster=r(
            base.cluster,
            num_learners=2,
            recluster_every=1,
            divide_until_epoch=1 if variant == "cvpr" else 2,
            finetune_from_epoch=1 if variant == "cvpr" else 2,
            hierarchical=variant == "tpami",
        ),
        eval=r(base.eval, recall_ks=(1, 2)),
        sweep=r(base.sweep, num_learners=(1, 2)),
    )
    validate(params)
    splits = load_splits(params.data)
    result = fit(params, build_bundle(splits, params.data), torch.device("cpu"), evaluate_untrained=False)
    (epochs, metrics) = result.evaluations[-1]
    assert epochs == params.train.epochs and 0 <= metrics["recall@1"] <= metrics["recall@2"] <= 1
    assert ("nmi" in metrics) == (splits.query is None)  # In-shop: query -> gallery protocol
