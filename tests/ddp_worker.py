"""Run by tests/test_ddp.py under the kit's torchrun (`python -m kit.launch … tests/ddp_worker.py`): trains fold 0
of a config given as JSON overrides of configs/demo.yaml, and records, per rank, what the test checks:

  <record>/rank<r>-writes.txt   every file this rank moved into place (atomic writes end in os.replace/rename)
  <record>/rank<r>-rows.json    the training rows of each step, per epoch (this rank's share)
  <record>/rank<r>-epochs.json  the epoch rows (losses, val AUC) as this rank computed them
  <record>/rank<r>.pt           this rank's final weights (the model itself, out of DDP)

`--kill-after N`: rank 0 (or `--kill-rank r`) kills itself (SIGKILL, as `kill -9` would) once epoch N is saved.
What stops a rank is reported as `python -m kit train` reports it (`kit.cli.run_reporting_errors`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from kit import batches, engine, fold
from kit.cli import run_reporting_errors
from kit.config import load_config
from kit.distributed import current

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overrides", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("--kill-rank", type=int, default=0)
    args = parser.parse_args()
    record = Path(args.record)
    record.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    cfg = load_config(REPO / "configs" / "demo.yaml", json.loads(args.overrides))

    writes = []
    for name in ("replace", "rename"):
        original = getattr(os, name)

        def moved(src, dst, *rest, _original=original, **options):
            writes.append(str(dst))
            return _original(src, dst, *rest, **options)
        setattr(os, name, moved)

    rows, epochs = {}, []
    gather = batches.gather_batch

    def recording_gather(images, picked, device):
        rows.setdefault(len(epochs) + 1, []).append([int(row) for row in picked])
        return gather(images, picked, device)
    batches.gather_batch = recording_gather

    finish = engine.FineTuning.finish

    def keep_weights(method, *rest, **options):
        torch.save(method.model.state_dict(), record / f"rank{rank}.pt")
        return finish(method, *rest, **options)
    engine.FineTuning.finish = keep_weights

    def on_epoch_end(epoch, row):
        epochs.append(row)
        dump(record, rank, writes, rows, epochs)
        if args.kill_after and epoch == args.kill_after and current().rank == args.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        return run_reporting_errors(lambda: fold.train_fold(cfg, 0, on_epoch_end=on_epoch_end))
    finally:
        dump(record, rank, writes, rows, epochs)


def dump(record: Path, rank: int, writes, rows, epochs) -> None:
    (record / f"rank{rank}-writes.txt").write_text("".join(f"{path}\n" for path in writes))
    (record / f"rank{rank}-rows.json").write_text(json.dumps(rows))
    (record / f"rank{rank}-epochs.json").write_text(json.dumps(epochs))


if __name__ == "__main__":
    sys.exit(main())
