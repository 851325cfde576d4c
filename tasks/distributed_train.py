"""One training segment on ``train.nproc_per_node`` processes: ``torchrun`` launcher and ranks.

The train task runs ``python -m tasks.distributed_train launch RUN_DIR CHECKPOINT DIVISION
SEGMENT`` (``SEGMENT`` as JSON, ``DIVISION`` ``-`` for all data). That process is the
launcher: it hands ``... rank RUN_DIR ...`` to ``torchrun`` (``torch.distributed.run``,
single node, ``--standalone`` rendezvous on a free port), which starts the ranks. A rank
joins the process group, trains the
segment from the checkpoint (:meth:`dcml.trainer.Trainer.train_segment` with its shard)
and rank 0 alone writes the epoch statistics and the segment's end checkpoint —
atomically, so a killed segment leaves no partial file and its rerun starts the segment
again from its input checkpoint.

Neither the launcher nor a rank outlives its parent: a ``kill -9`` of the task's process
(or of the launcher) ends the ranks within a second (:func:`exit_with_parent`), so a rerun
never races a leftover rank for the run folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

POLL_SECONDS = 0.5


def exit_with_parent(on_exit=lambda: None) -> None:
    """A daemon thread that calls ``on_exit`` and ends this process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        on_exit()
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def command(run_dir: str, checkpoint: str, division: str | None, segment) -> list[str]:
    """The launcher's command line (run by the train task)."""
    return [
        sys.executable,
        "-m",
        "tasks.distributed_train",
        "launch",
        run_dir,
        checkpoint,
        division or "-",
        json.dumps(asdict(segment)),
    ]


def launch(nproc: int, args: list[str]) -> int:
    """Run the ranks under torchrun; its exit status."""
    from torch.distributed.run import main as torchrun

    def stop_ranks() -> None:  # torchrun stops its ranks on SIGTERM; the ranks also watch it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    exit_with_parent(stop_ranks)
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "--module", "tasks.distributed_train", "rank", *args])
    except SystemExit as error:
        return int(error.code or 0)
    except Exception as error:  # noqa: BLE001 - torchrun's ChildFailedError: the ranks printed theirs
        print(f"distributed training failed: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def rank(run_dir: str, checkpoint: str, division: str | None, segment_json: str) -> None:
    """One rank: train the segment; rank 0 writes statistics and the end checkpoint."""
    exit_with_parent()
    from dcml import distributed
    from dcml.division import all_data
    from dcml.schedule import Segment
    from dcml.trainer import Trainer
    from tasks import io
    from tasks.layout import RunLayout
    from tasks.runs import bundle_for, device_for, run_params

    layout = RunLayout(Path(run_dir))
    segment = Segment(**json.loads(segment_json))
    params = run_params(layout)
    shard, device = distributed.init(device_for(params).type)
    try:
        bundle = bundle_for(params)
        trainer = Trainer.from_checkpoint(checkpoint, device, params=params)
        learners_data = io.read_division(division) if division else all_data(len(bundle.splits.train))
        main = distributed.is_main(shard)

        def on_epoch(stats) -> None:
            if main:
                io.write_json(layout.epoch_stats(stats.epoch), {**stats.as_dict(), "mode": segment.mode})
                print(
                    f"epoch {stats.epoch} ({segment.mode}): loss {stats.loss:.4f}, {stats.images_per_second:.0f} img/s "
                    f"on {shard.world} processes, {stats.seconds:.1f} s",
                    flush=True,
                )

        trainer.train_segment(
            segment, bundle.train, bundle.splits.train.labels, learners_data, on_epoch=on_epoch, shard=shard
        )
        if main:
            trainer.save(layout.checkpoint(segment.end_epoch))
    finally:
        distributed.close()


def main(argv: list[str]) -> int:
    mode, run_dir, checkpoint, division, segment_json = argv
    division = None if division == "-" else division
    if mode == "rank":
        rank(run_dir, checkpoint, division, segment_json)
        return 0
    from tasks.layout import RunLayout
    from tasks.runs import run_params

    nproc = run_params(RunLayout(Path(run_dir))).train.nproc_per_node
    return launch(nproc, argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
