"""Run by tests/test_distributed.py, alone or under ``torchrun``: trains one segment of a
tiny model on synthetic images and writes the epoch losses and final weights (rank 0).

usage: python tests/distributed_worker.py OUT.pt FREEZE_BN(0|1) LEARNERS(slices|masks)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dcml import distributed  # noqa: E402
from dcml.config import load_params  # noqa: E402
from dcml.division import Division  # noqa: E402
from dcml.schedule import Segment  # noqa: E402
from dcml.trainer import Trainer  # noqa: E402

NUM_CLASSES, PER_CLASS, SIZE = 8, 6, 24


class Images(torch.utils.data.Dataset):
    """Fixed random images; ``(index, seed)`` adds noise drawn from ``seed`` (an augmentation)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
        base = torch.randn(NUM_CLASSES, 3, SIZE, SIZE, generator=generator)
        self.images = base[self.labels] + 0.5 * torch.randn(len(self.labels), 3, SIZE, SIZE, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index, seed = key
        noise = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
        return self.images[index] + 0.1 * noise, int(self.labels[index]), index


def params(freeze_bn: bool, learners: str):
    p = load_params(REPO_ROOT / "params.yaml")
    r = dataclasses.replace
    model = r(p.model, embedding_dim=16, dropout=0.0, freeze_bn=freeze_bn, learners=learners, pretrained="none")
    # 12 images per batch (4 classes x 3): shards of 6; the 3-class cluster gives 9 (shards of 5 and 4)
    train = r(p.train, batch_size=12, images_per_class=3, device="cpu", lr_backbone=1e-3, lr_embedding=1e-3)
    cluster = r(p.cluster, num_learners=2, hierarchical=False)
    return r(p, model=model, train=train, cluster=cluster, data=r(p.data, num_workers=0), seed=3)


def main() -> None:
    out, freeze_bn, learners = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
    shard = distributed.shard_from_env()
    if shard.world > 1:
        shard, device = distributed.init("cpu")
    torch.set_num_threads(1)
    if os.environ.get("DCML_TEST_FLOAT64"):
        torch.set_default_dtype(torch.float64)
    data = Images()
    p = params(freeze_bn, learners)
    trainer = Trainer.create(p, NUM_CLASSES, torch.device("cpu"))
    first_grads: dict[str, torch.Tensor] = {}

    def record_first_step(optimizer, args, kwargs) -> None:  # the gradients of the first step, before Adam
        if not first_grads:
            for name, parameter in trainer.model.named_parameters():
                if parameter.grad is not None:
                    first_grads[name] = parameter.grad.detach().clone()

    trainer.optimizer.register_step_pre_hook(record_first_step)
    # two learners: classes 0-4 and 5-7 (the second cluster's batches have 3 classes x 3 = 9 images: odd shards)
    assignment = (data.labels >= 5).astype(np.int64)
    division = Division(assignment, np.ones(len(assignment), dtype=bool), 2, 0, {})
    stats = trainer.train_segment(Segment(0, 2, "divide", True, 2, 0), data, data.labels, division, shard=shard)
    stats += trainer.train_segment(Segment(2, 3, "finetune", False, 1), data, data.labels, division, shard=shard)
    if distributed.is_main(shard):
        state = {
            name: value.detach().clone() for name, value in trainer.model.state_dict().items() if torch.is_tensor(value)
        }
        record = {"losses": [s.loss for s in stats], "images": [s.num_images for s in stats], "state": state}
        torch.save({**record, "grads": first_grads, "dtype": str(trainer.model.embedding.weight.dtype)}, out)
    distributed.close()


if __name__ == "__main__":
    main()
