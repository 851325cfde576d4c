"""Training-step throughput: our loop (dcml.train.train_epoch) vs a bare torch loop.

Both run the same model, input size, batch size, loss and optimiser on synthetic tensors
already in memory, so the difference is the loop's own overhead (batch bookkeeping,
learner slicing, NaN checks, DataLoader over an in-memory dataset).

    python bench/bench_train_step.py --backbone small_cnn --image-size 64 --batch-size 32
    python bench/bench_train_step.py --backbone resnet50 --image-size 224 --batch-size 80 \
        --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import TensorDataset

from dcml.config import LossConfig, ModelConfig, TrainConfig
from dcml.device import resolve_device
from dcml.losses import build_loss
from dcml.model import Embedder
from dcml.train import build_optimizer, train_epoch


class IndexedTensors(TensorDataset):
    """(image, label, index) like dcml's ImageDataset, from tensors in memory."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, index


def setup(args, device):
    model_config = ModelConfig(backbone=args.backbone, pretrained="none", embedding_dim=128, freeze_bn=False)
    model = Embedder(model_config, num_learners_init=args.num_learners).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss = build_loss(LossConfig(), num_classes=args.batch_size // 4).to(device)
    optimizer = build_optimizer(model, loss, TrainConfig(lr_backbone=1e-5, lr_embedding=1e-5), 5e-4)
    return model, loss, optimizer


def data(args):
    n = args.batch_size * args.steps
    images = torch.randn(n, 3, args.image_size, args.image_size)
    labels = torch.arange(n) // 4 % (args.batch_size // 4)  # P classes x 4 images per batch
    return images, labels


def bench_ours(args, device) -> float:
    model, loss, optimizer = setup(args, device)
    images, labels = data(args)
    dataset = IndexedTensors(images, labels)
    batches = [
        (step % args.num_learners, list(range(step * args.batch_size, (step + 1) * args.batch_size)))
        for step in range(args.steps)
    ]
    kwargs = dict(
        epoch=0,
        num_learners=args.num_learners,
        device=device,
        bf16=args.bf16,
        channels_last=args.channels_last,
    )
    train_epoch(model, loss, optimizer, dataset, batches[: args.warmup], **kwargs)
    _sync(device)
    stats = train_epoch(model, loss, optimizer, dataset, batches, **kwargs)
    return stats.images_per_second


def bench_bare(args, device) -> float:
    model, loss, optimizer = setup(args, device)
    images, labels = data(args)
    images, labels = images.to(device), labels.to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()

    def step(i):
        batch = slice(i * args.batch_size, (i + 1) * args.batch_size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda"):
            embeddings = model(images[batch], num_learners=args.num_learners, learner=i % args.num_learners)
        value = loss(embeddings.float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    for i in range(args.warmup):
        step(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--num-learners", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    bare = bench_bare(args, device)
    ours = bench_ours(args, device)
    report = {
        **{k: v for k, v in vars(args).items()},
        "device": str(device),
        "bare_images_per_s": round(bare, 1),
        "dcml_images_per_s": round(ours, 1),
        "overhead_percent": round(100 * (bare - ours) / bare, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
