"""studies/study.py: the variants' params files, checked before anything runs."""

import dataclasses
import importlib.util

import yaml

from dcml.config import apply_preset, params_from_dict, with_num_learners
from tasks.report import variant_label
from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("study", REPO_ROOT / "studies" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_each_study_gives_valid_variants_that_share_the_k1_baseline():
    for name in ("demo", "omniglot", "omniglot-pretrained"):
        definition = yaml.safe_load((REPO_ROOT / "studies" / f"{name}.yaml").read_text())
        raw = {v: study.variant_params(definition, v, "somewhere") for v in definition["variants"]}
        params = {v: params_from_dict(apply_preset(r)) for v, r in raw.items()}
        cvpr = params.pop("cvpr")
        assert cvpr.data.root == "somewhere" and cvpr.model.learners == "slices"
        for tpami in params.values():
            assert (tpami.model.learners, tpami.cluster.hierarchical) == ("masks", True)
            assert with_num_learners(cvpr, 1, 0) == with_num_learners(tpami, 1, 0)  # one K=1 run serves all
            assert dataclasses.replace(tpami, model=cvpr.model, cluster=cvpr.cluster) == cvpr  # nothing else differs
        labels = {variant_label(with_num_learners(p, 4, 0)) for p in params.values()}
        assert len(labels) == len(params)  # each variant is its own row of the comparison


def test_a_bad_study_fails_before_running_anything(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"seeds": [0], "num_learners": [4], "variants": {"x": {"model": {"learnerz": 1}}}}))
    assert study.main([str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "model.learnerz" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("runs"))
