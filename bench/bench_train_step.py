"""Training-step throughput: our loop (resumed Trainer.train_segment) vs a bare torch loop.

Our loop runs as the pipeline runs it: ``Trainer.create`` trains a short warm-up epoch,
is saved with ``Trainer.save`` and restored with ``Trainer.from_checkpoint(path, device)``
(so Adam's state comes from a checkpoint, as in every task after the first), then
``train_segment`` trains the timed epoch over an in-memory dataset through our
DataLoader (collation, pinning on CUDA, ``data.num_workers``). The bare loop steps the
same model, loss and optimiser (``Trainer.create``, same params) over batches that are
already on the device, prepared before the clock starts. Both use the paper presets'
frozen BatchNorm for ResNets (``model.freeze_bn``; it needs ``model.pretrained`` != none,
so a randomly initialised backbone is saved to a local .pth and used as "pretrained").
The trainer that trained the warm-up epoch is also timed on the same epoch without the
checkpoint round trip (``dcml_continuing_images_per_s``): the resume cost is the gap.

    .venv/bin/python bench/bench_train_step.py --backbone small_cnn --image-size 64 --batch-size 32
    .venv/bin/python bench/bench_train_step.py --backbone resnet50 --image-size 224 --batch-size 80 \
        --bf16 --channels-last --cudnn-benchmark --tf32 --sync-steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_switch_arguments,
    backend_switches,
    parse_workers,
    run_config_from_args,
    temp_folder,
    train_step_bench,
)

from dcml.device import resolve_device  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed batches (rounded up to a multiple of K)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up batches (epoch 0, before the checkpoint)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--num-learners", type=int, default=4, help="K; 1 = full embedding (finetune)")
    parser.add_argument("--num-workers", type=parse_workers, default=0, help="data.num_workers of our loop")
    add_switch_arguments(parser)
    parser.add_argument("--sync-steps", type=int, default=0, help="CUDA: count host syncs over N more steps")
    parser.add_argument("--no-continuing", action="store_true", help="skip timing the non-resumed trainer")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    config = run_config_from_args(args)
    with temp_folder() as folder:
        result = train_step_bench(
            config,
            device,
            steps=args.steps,
            warmup=args.warmup,
            folder=folder,
            repeats=args.repeats,
            continuing=not args.no_continuing,
            sync_steps=args.sync_steps,
        )
    report = {**vars(args), "device": str(device), "freeze_bn": config.freeze_bn}
    report |= {"backend_switches": backend_switches(), **result}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
