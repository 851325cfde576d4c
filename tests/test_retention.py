"""What a run folder keeps (tasks/retention.py), on files laid out as a run writes them."""

from pathlib import Path

import pytest

from tasks.layout import RunLayout
from tasks.retention import prune


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture()
def layout(tmp_path):
    return RunLayout(tmp_path / "K4-seed0-abcd1234")


def names(paths):
    return sorted(p.name for p in paths)


def test_keeps_the_newest_checkpoints_and_the_final_one(layout):
    for epoch in (0, 2, 4, 6):
        touch(layout.checkpoint(epoch))
    prune(layout, keep_checkpoints=1, final_epoch=10)
    assert list(layout.checkpoints()) == [6]
    for epoch in (8, 10):
        touch(layout.checkpoint(epoch))
    prune(layout, keep_checkpoints=3, final_epoch=10)
    assert sorted(layout.checkpoints()) == [6, 8, 10]
    prune(layout, keep_checkpoints=1, final_epoch=8)  # the final one survives keep=1
    assert sorted(layout.checkpoints()) == [8, 10]


def test_train_embeddings_go_once_their_division_exists(layout):
    touch(layout.embeddings("train", 0))
    touch(layout.embeddings("train", 2))
    touch(layout.division(0))
    deleted = prune(layout, keep_checkpoints=1, final_epoch=4)
    assert names(deleted) == ["train-epoch-0000.parquet"]
    assert list(layout.embedding_files("train")) == [2]  # not clustered yet: kept


def test_test_embeddings_kept_for_the_newest_evaluation_and_the_final_epoch(layout):
    for epoch in (0, 2, 4):
        touch(layout.embeddings("test", epoch))
    touch(layout.evaluation(0))
    touch(layout.evaluation(2))
    prune(layout, keep_checkpoints=1, final_epoch=4)
    # 0: evaluated and superseded; 2: newest evaluation; 4: not evaluated yet (a crash)
    assert sorted(layout.embedding_files("test")) == [2, 4]
    touch(layout.evaluation(4))
    prune(layout, keep_checkpoints=1, final_epoch=4)
    assert sorted(layout.embedding_files("test")) == [4]


def test_small_files_and_other_names_are_never_deleted(layout):
    kept = [
        touch(layout.division(0)),
        touch(layout.evaluation(0)),
        touch(layout.epoch_stats(0)),
        touch(layout.params),
        touch(layout.root / "checkpoints" / "notes.txt"),
    ]
    prune(layout, keep_checkpoints=1, final_epoch=2)
    assert all(path.exists() for path in kept)


def test_keep_checkpoints_is_not_part_of_the_run_key(tiny_params):
    import dataclasses

    from dcml.config import to_dict
    from tasks.layout import params_digest

    def key(**train):
        return params_digest(
            to_dict(dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, **train)))
        )

    assert key(keep_checkpoints=1) == key(keep_checkpoints=5)
    assert key(epochs=3) != key(epochs=4)
    raw = to_dict(tiny_params)
    assert params_digest(raw) == params_digest(raw, "cpu") != params_digest(raw, "cuda")  # GPU runs differ


def test_the_run_key_follows_the_data(tiny_params, tiny_demo_root, tmp_path):
    import dataclasses
    import shutil

    from tasks.provenance import data_version

    copy = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, copy)
    data = dataclasses.replace(tiny_params.data, root=str(copy))
    before = data_version(data)
    assert before.startswith("files:") and before == data_version(dataclasses.replace(data, num_workers=2))
    first_class = next(p for p in sorted(copy.iterdir()) if p.is_dir())
    sorted(first_class.iterdir())[0].unlink()  # one image fewer
    data_version.cache_clear()
    assert data_version(data) != before
    # DVC-tracked data: its content hash, from the .dvc file next to the folder
    (tmp_path / "demo.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: demo\n")
    data_version.cache_clear()
    assert data_version(data) == "dvc:0123abcd.dir"
