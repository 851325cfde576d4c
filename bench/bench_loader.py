"""Loader + step throughput over JPEG files vs a bare torch loop over in-memory tensors.

Writes a class-folder dataset of JPEG files (smooth colour fields with mild noise, so they
compress and decode like photos) into a temporary folder, reads it as dcml's ``folder``
dataset (``load_splits`` + ``build_bundle``: the paper's train transforms) and reports
images/s of

- ``dcml``: one full epoch of ``Trainer.train_segment`` (our DataLoader with
  ``data.num_workers`` + the training step), on a trainer restored with
  ``Trainer.from_checkpoint`` after a short warm-up epoch, as in the pipeline;
- ``loader``: the same epoch's batches through the DataLoader our training uses
  (``dcml.train.train_loader``), copied to the device, without a step;
- ``bare``: the bare torch loop (same model, loss, optimiser, batch shape) on tensors
  already on the device.

``ratio_dcml_to_bare`` is the share of the bare loop's speed that our loop reaches;
``bound_images_per_s`` = min(loader, bare) is what perfect overlap of loading and
compute would give.

    .venv/bin/python bench/bench_loader.py --backbone small_cnn --image-size 64 --num-workers 0
    .venv/bin/python bench/bench_loader.py --backbone resnet50 --image-size 224 --batch-size 80 \
        --images 2000 --num-workers auto --bf16 --channels-last --cudnn-benchmark --tf32
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
    loader_bench,
    parse_size,
    parse_workers,
    run_config_from_args,
    temp_folder,
    write_jpeg_folder,
)

from dcml.device import resolve_device  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64, help="network input (RandomResizedCrop size)")
    parser.add_argument("--jpeg-size", default=None, help="size of the JPEG files, W or WxH (default: image size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=512, help="training images (one epoch is timed)")
    parser.add_argument("--images-per-class", type=int, default=8)
    parser.add_argument("--num-workers", type=parse_workers, default=0, help="data.num_workers: N or auto")
    parser.add_argument("--num-learners", type=int, default=1, help="K; 1 = full embedding (finetune)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (epochs); medians reported")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up batches (epoch 0, before the checkpoint)")
    add_switch_arguments(parser)
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary dataset folder")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    config = run_config_from_args(args)
    with temp_folder(args.tmp_dir) as folder:
        root = folder / "jpegs"
        dataset = write_jpeg_folder(
            root,
            args.images,
            size=parse_size(args.jpeg_size or str(args.image_size)),
            images_per_class=args.images_per_class,
        )
        result = loader_bench(config, device, root, folder, warmup=args.warmup, repeats=args.repeats)
    report = {**vars(args), "device": str(device), "freeze_bn": config.freeze_bn, "dataset": dataset}
    report |= {"backend_switches": backend_switches(), **result}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
