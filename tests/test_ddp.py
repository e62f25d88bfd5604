"""One fold on two processes (DDP over gloo, on the CPU), launched by the kit's torchrun as `make train NPROC=2` does:
identical weights on both ranks, only rank 0 writes, the gathered OOF covers the fold once, resume after kill -9,
the same run across two "machines" (torchrun's c10d rendezvous on loopback), and every rank's share of a batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from kit import distributed
from kit.batches import CachedBatches, SeededBatchSampler
from kit.checkpoints import load_checkpoint
from kit.data import read_train_labels
from kit.engine import check_ddp_config
from kit.errors import KitError
from kit.fold import train_fold
from kit.folds import load_split
from kit.models import build_model, head_parameter_names
from kit.runs import fold_dir

from conftest import REPO

WORKER = REPO / "tests" / "ddp_worker.py"


def overrides(demo_data, out_dir, **more) -> dict:
    values = {"data_dir": str(demo_data), "out_dir": str(out_dir), "epochs": 2, "batch_size": 32,
              "folds.n_splits": 2, "eval_batch_size": 128, "max_train_images": 64, "train.ema_decay": 0.9,
              "train.freeze_backbone_epochs": 1, "tta.views": "hflip"}
    values.update(more)
    return values


def launch(launcher_args: list[str], values: dict, record, kill_after: int = 0, kill_rank: int = 0,
           timeout: int = 240):
    """`python -m kit.launch <launcher_args> tests/ddp_worker.py …`: the Makefile's NPROC path with the worker."""
    command = [sys.executable, "-m", "kit.launch", *launcher_args, str(WORKER), "--overrides", json.dumps(values),
               "--record", str(record)] + (["--kill-after", str(kill_after), "--kill-rank", str(kill_rank)]
                                           if kill_after else [])
    # one thread per process in every launch form: sums split over another thread count round differently
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process, timeout: int = 240) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def meeting_point(first_machine) -> tuple[str, list[str]]:
    """The endpoint the first machine's launcher opened on a free port (RDZV=127.0.0.1:0), read from its waiting
    line; and the lines it printed up to there. A launcher that says nothing for 120 s is killed (the read ends)."""
    lines, silent = [], threading.Timer(120, first_machine.kill)
    silent.start()
    try:
        for line in first_machine.stdout:
            lines.append(line)
            found = re.match(r"waiting for 2 machines to meet at (127\.0\.0\.1:(\d+)) ", line)
            if found:
                assert int(found.group(2)) != 0, line
                return found.group(1), lines
    finally:
        silent.cancel()
    raise AssertionError("".join(lines) or "the first machine said nothing")


@pytest.mark.slow
def test_two_ranks_train_one_fold_resume_after_kill_and_match_a_two_machine_run(demo_data, tmp_path):
    out, record = tmp_path / "runs", tmp_path / "record"
    values = overrides(demo_data, out, cache_dir=str(tmp_path / "local-disk"))     # runs shared, cache local
    one_machine = ["--nproc_per_node", "2"]

    # killed (-9) on rank 0 once epoch 1 is saved: torchrun stops rank 1 too, and says so in one line
    code, output = finished(launch(one_machine, values, record / "killed", kill_after=1))
    assert code == 2 and "Traceback" not in output, output
    assert "error: the run stopped: rank 0 was killed by SIGKILL (the out-of-memory killer, or kill -9)" in output
    assert output.strip().splitlines()[-1].endswith("every epoch saved before is kept: rerun the same command to "
                                                    "resume")
    last = load_checkpoint(fold_dir_of(values) / "last.pt")
    assert last["epoch"] == 1 and last["world_size"] == 2

    # epoch 1 had the backbone frozen (by a zero learning rate under DDP): only the head moved
    cfg = load_cfg(values)
    torch.manual_seed(cfg.seed * 1000 + 0)
    initial = build_model(cfg.model)
    head = head_parameter_names(initial)
    for name, parameter in initial.named_parameters():
        moved = not torch.equal(last["model"][name], parameter.detach())
        assert moved == (name in head), f"{name} {'moved' if moved else 'did not move'} in the frozen epoch"

    # another process count would draw other shares and augmentations: refused, naming both ways out
    with pytest.raises(KitError, match=r"2 process\(es\) \(NPROC=2\), not 1.*NPROC=2.*FORCE=1"):
        train_fold(cfg, 0, log=lambda *_: None)

    code, output = finished(launch(one_machine, values, record / "resumed"))
    assert code == 0, output
    assert "resuming after epoch 1" in output

    # both ranks hold the same weights, BatchNorm statistics included
    rank0, rank1 = (torch.load(record / "resumed" / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    # every rank computed the same validation AUC (sharded predictions gathered back)
    epochs = [json.loads((record / "resumed" / f"rank{r}-epochs.json").read_text()) for r in (0, 1)]
    assert [e["val_auc"] for e in epochs[0]] == [e["val_auc"] for e in epochs[1]] and len(epochs[0]) == 1

    # rank 0 alone wrote in the run folder (rank 1 moved no file into place, in either run)
    for run in ("killed", "resumed"):
        assert (record / run / "rank1-writes.txt").read_text() == ""
        assert "last.pt" in (record / run / "rank0-writes.txt").read_text()

    # the out-of-fold file covers the validation fold exactly once; the history has both epochs
    folder = fold_dir_of(values)
    oof = pd.read_csv(folder / "oof.csv", dtype={"id": str})
    split = load_split(read_train_labels(demo_data), cfg.folds, out / "folds")
    valid_ids = split.folds.loc[split.folds["fold"] == 0, "id"]
    assert sorted(oof["id"]) == sorted(valid_ids) and oof["id"].is_unique
    assert pd.read_csv(folder / "history.csv")["epoch"].tolist() == [1, 2]
    assert json.loads((folder / "metrics.json").read_text())["processes"] == 2
    assert list((tmp_path / "local-disk").glob("*/train-*.npy")) and not (out / "cache").exists()

    # the same run, uninterrupted, as two machines of one process each meeting through c10d on loopback
    reference = overrides(demo_data, tmp_path / "two-machines")
    two_machines = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "test"]
    first = launch([*two_machines, "--rdzv-endpoint", "127.0.0.1:0"], reference, record / "machine0")
    endpoint, said = meeting_point(first)
    second = launch([*two_machines, "--rdzv-endpoint", endpoint], reference, record / "machine1")
    for machine, before in ((first, "".join(said)), (second, "")):
        code, output = finished(machine)
        assert code == 0, before + output
    uninterrupted = torch.load(next((record / f"machine{m}" / "rank0.pt") for m in (0, 1)
                                    if (record / f"machine{m}" / "rank0.pt").exists()))
    assert all(torch.equal(rank0[k], uninterrupted[k]) for k in rank0), "resumed run differs from uninterrupted"


def fold_dir_of(values: dict):
    return fold_dir(load_cfg(values), 0)


def load_cfg(values: dict):
    from kit.config import load_config

    return load_config(REPO / "configs" / "demo.yaml", values)


def test_train_all_on_two_processes_trains_every_fold_and_says_the_cv_auc_once(demo_data, tmp_path):
    command = [sys.executable, "-m", "kit.launch", "--nproc_per_node", "2", "-m", "kit", "train-all", "--config",
               "configs/demo.yaml", "--data-dir", str(demo_data), "--out", str(tmp_path / "runs"), "epochs=1",
               "folds.n_splits=2", "max_train_images=64", "tta.views=none"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("demo: CV AUC") == 1 and done.stdout.count("fold 1: done") == 1
    for fold in (0, 1):
        assert json.loads((tmp_path / "runs" / "demo" / f"fold{fold}" / "metrics.json").read_text())["processes"] == 2


def test_a_failure_on_the_ranks_is_one_line(demo_data, tmp_path):
    values = overrides(demo_data, tmp_path / "runs", batch_size=33)
    code, output = finished(launch(["--nproc_per_node", "2"], values, tmp_path / "record"))
    assert code == 2
    assert "batch_size 33 does not split over 2 processes" in output and "Traceback" not in output
    assert output.count("does not split") == 1          # rank 0 speaks for both


def test_what_ddp_needs_of_the_config_is_checked_first():
    cfg = load_cfg({"batch_size": 32, "train.sync_bn": True})
    check_ddp_config(cfg, torch.device("cuda"), 2)                      # 16 a rank, BatchNorm synced on GPUs
    with pytest.raises(KitError, match="batch_size 32 does not split over 3 processes"):
        check_ddp_config(cfg, torch.device("cuda"), 3)
    with pytest.raises(KitError, match="train.sync_bn needs GPUs"):
        check_ddp_config(cfg, torch.device("cpu"), 2)


@pytest.mark.parametrize("path", ["batch", "albumentations"])
def test_each_rank_takes_an_equal_disjoint_share_of_every_batch(monkeypatch, path):
    """Two ranks' steps, side by side, make up the one-process run's steps; their augmentation seeds differ."""
    rows, labels = np.arange(100, 300), np.zeros(200)
    images = np.zeros((300, 96, 96, 3), dtype=np.uint8)

    def steps(rank: int, world: int) -> list[list[int]]:
        monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(rank, world))
        if path == "batch":
            seen = []
            monkeypatch.setattr("kit.batches.gather_batch",
                                lambda images, picked, device: seen.append(sorted(picked)) or torch.zeros(
                                    (len(picked), 96, 96, 3), dtype=torch.uint8))
            batches = CachedBatches(images, rows, labels, 32, torch.device("cpu"))
            batches.set_seed(7)
            for _ in batches:
                pass
            return [[int(row) for row in step] for step in seen], None
        sampler = SeededBatchSampler(len(rows), 32)
        sampler.set_seed(7)
        batches = list(sampler)
        seeds = {seed for batch in batches for _, seed in batch}
        return [sorted(item for item, _ in batch) for batch in batches], seeds

    whole, whole_seeds = steps(0, 1)
    (share0, seeds0), (share1, seeds1) = steps(0, 2), steps(1, 2)
    assert len(share0) == len(share1) == len(whole) == 6
    for step, (a, b) in enumerate(zip(share0, share1)):
        assert len(a) == len(b) == 16 and not set(a) & set(b)
        assert sorted(a + b) == whole[step]
    if path == "albumentations":
        assert seeds0 == whole_seeds and not seeds0 & seeds1


@pytest.mark.slow
def test_a_killed_rank_a_bad_nproc_and_a_lonely_machine_are_each_one_line(demo_data, tmp_path):
    values = overrides(demo_data, tmp_path / "runs", epochs=2, max_train_images=64, **{"tta.views": "none"})
    code, output = finished(launch(["--nproc_per_node", "2"], values, tmp_path / "record", kill_after=1, kill_rank=1))
    assert code == 2 and "Traceback" not in output, output
    assert "rank 1 was killed by SIGKILL (the out-of-memory killer, or kill -9)" in output
    assert "the reason is above" not in output

    for bad in ("0", "-1", "abc"):
        code, output = finished(launch(["--nproc_per_node", bad], values, tmp_path / "record"))
        assert code == 2 and output.strip() == (f"error: NPROC={bad}: the processes per machine must be a whole "
                                                f"number of at least 1 (e.g. NPROC=2, one per GPU)"), output

    # NNODES=2 and nobody else comes: the rendezvous on a free port of this machine, named in both lines
    code, output = finished(launch(["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                                    "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", "alone", "--rdzv-conf",
                                    "join_timeout=3"], values, tmp_path / "record"), timeout=120)
    lines = output.strip().splitlines()
    assert code == 2 and "Traceback" not in output, output
    endpoint = re.match(r"waiting for 2 machines to meet at (127\.0\.0\.1:[1-9]\d*) \(", lines[0]).group(1)
    assert lines[-1].startswith(f"error: the 2 machines did not meet at {endpoint} (RendezvousTimeoutError") and \
        lines[-1].endswith("within the join timeout"), output

    # port 0 means "a free port here": another machine cannot open it for the first one
    code, output = finished(launch(["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                                    "--rdzv-endpoint", "192.0.2.1:0", "--rdzv-id", "elsewhere"], values,
                                   tmp_path / "record"), timeout=120)
    assert code == 2 and output.strip() == ("error: RDZV=192.0.2.1:0: port 0 (a free port) only on the machine "
                                            "192.0.2.1 itself; the others join at the port its waiting line names")
