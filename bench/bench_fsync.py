"""What durable writes cost: checkpoint save time with and without fsync.

`dcml.atomic.atomic_path` flushes each file before its rename and the folder after it.
This saves a real checkpoint (model, Adam moments after one step, loss, RNG states) of
each backbone `--repeats` times with fsync on and off, alternating, into `--dir` (default:
a temporary folder beside `outputs/`, so on the disk the runs use), and prints one JSON
object: per backbone the file size and the median / min / max seconds of each mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dcml import atomic  # noqa: E402
from dcml.config import load_params  # noqa: E402
from dcml.trainer import Trainer  # noqa: E402


def trainer_for(backbone: str) -> Trainer:
    params = load_params(ROOT / "params.yaml")
    model = dataclasses.replace(params.model, backbone=backbone, pretrained="none", freeze_bn=False)
    params = dataclasses.replace(params, model=model, train=dataclasses.replace(params.train, device="cpu"))
    trainer = Trainer.create(params, 100, torch.device("cpu"), load_pretrained=False)
    for group in trainer.optimizer.param_groups:  # one step: Adam's moments exist, as in every saved checkpoint
        for parameter in group["params"]:
            parameter.grad = torch.zeros_like(parameter)
    trainer.optimizer.step()
    return trainer


def timed_saves(trainer: Trainer, folder: Path, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"fsync": [], "no_fsync": []}
    for i in range(repeats):
        for mode in ("fsync", "no_fsync") if i % 2 == 0 else ("no_fsync", "fsync"):
            atomic.DURABLE = mode == "fsync"
            path = folder / f"epoch-{i:04d}-{mode}.pt"
            start = time.perf_counter()
            trainer.save(path)
            times[mode].append(time.perf_counter() - start)
            path.unlink()
    atomic.DURABLE = True
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: beside outputs/)")
    args = parser.parse_args()
    base = args.dir or ROOT
    base.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"repeats": args.repeats, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix=".bench-fsync-", dir=base) as tmp:
        for backbone in args.backbones:
            trainer = trainer_for(backbone)
            size = trainer.save(Path(tmp) / "size.pt").stat().st_size
            times = timed_saves(trainer, Path(tmp), args.repeats)
            result[backbone] = {
                "checkpoint_mb": round(size / 1e6, 2),
                **{
                    mode: {
                        "median_s": round(statistics.median(values), 4),
                        "min_s": round(min(values), 4),
                        "max_s": round(max(values), 4),
                    }
                    for mode, values in times.items()
                },
            }
            print(f"{backbone}: {result[backbone]}", file=sys.stderr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
