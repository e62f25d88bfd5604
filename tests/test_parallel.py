"""Fold-parallel training (`make train-all PARALLEL=N`): folds in worker processes, shared data built once, the fold
lock respected, a failed fold named while the others finish, Ctrl-C that stops all and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kit import api
from kit.checkpoints import load_checkpoint
from kit.data import cache_dir_for
from kit.errors import KitError
from kit.parallel import prepare_shared, resolve_parallel
from kit.runs import experiment_dir, fold_dir, fold_lock

from conftest import REPO, as_from_a_terminal, lock_held_elsewhere


def test_two_folds_are_trained_by_two_processes_on_data_built_once(quick_config):
    cfg = quick_config(epochs=1)
    prepare_shared(cfg, log=lambda *_: None)
    (cache,) = cache_dir_for(cfg, cfg.data_dir).glob("train-*.npy")
    built = cache.stat().st_ino
    messages = []
    cv_auc = api.train_all(cfg, parallel=2, log=messages.append)
    assert all((fold_dir(cfg, fold) / "metrics.json").is_file() for fold in (0, 1))
    assert [p.stat().st_ino for p in cache.parent.glob("train-*.npy")] == [built], "no worker built the cache again"
    holders = {(experiment_dir(cfg) / f"fold{fold}.lock").read_text().split()[1] for fold in (0, 1)}
    assert len(holders) == 2 and str(os.getpid()) not in holders, "each fold in a process of its own"
    for fold in (0, 1):
        assert f"fold {fold} epoch 1/1" in (experiment_dir(cfg) / f"fold{fold}.log").read_text()
        assert any(m.startswith(f"[fold {fold}] ") and "done, best val AUC" in m for m in messages), messages
    pooled = pd.concat([pd.read_csv(fold_dir(cfg, fold) / "oof.csv") for fold in (0, 1)])
    assert len(pooled) == 320 and cv_auc == pytest.approx(roc_auc_score(pooled["label"], pooled["pred"]))
    assert messages[-1] == f"demo: CV AUC {cv_auc:.4f} (pooled out-of-fold predictions with hflip TTA, 2 folds)"
    messages.clear()
    api.train_all(cfg, parallel=2, log=messages.append)
    assert messages[0] == "demo: every fold is trained; pass FORCE=1 to train them again"


def test_a_fold_held_by_another_process_fails_alone_naming_its_log(quick_config):
    cfg = quick_config(epochs=1)
    with lock_held_elsewhere(experiment_dir(cfg) / "fold1.lock") as holder:
        with pytest.raises(KitError) as caught:
            api.train_all(cfg, parallel=2, log=lambda *_: None)
    message = str(caught.value)
    assert message.startswith(f"fold 1 failed ({experiment_dir(cfg)}/fold1.log ends: ")
    assert f"is being trained by PID {holder.pid}" in message
    assert (fold_dir(cfg, 0) / "metrics.json").is_file(), "the other fold finished"


def test_parallel_values():
    assert resolve_parallel("auto") == 1 and resolve_parallel(3) == 3 and resolve_parallel("2") == 2
    for bad in ("0", "-1", "two", None):
        with pytest.raises(KitError, match="PARALLEL must be a positive whole number or auto"):
            resolve_parallel(bad)


# Loaded at start-up by every Python process of a run given its folder on PYTHONPATH: a fold worker (KIT_PARENT_PID
# set) stops once its first epoch is saved, marks that, and waits there until Ctrl-C reaches it. No fold can finish
# before both have saved an epoch, however the two share the machine.
HOLD_AFTER_EPOCH_1 = """
import os
if os.environ.get("KIT_PARENT_PID"):
    import time
    from pathlib import Path

    import kit.fold

    train_fold = kit.fold.train_fold

    def held_after_epoch_1(cfg, fold, *args, on_epoch_end=None, **options):
        def hold(epoch, row):
            if epoch == 1:
                Path(os.environ["KIT_TEST_MARKS"], f"fold{fold}").touch()
                while True:
                    time.sleep(0.05)
        return train_fold(cfg, fold, *args, on_epoch_end=hold, **options)

    kit.fold.train_fold = held_after_epoch_1
"""


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_the_rerun_resumes_each_fold(quick_config, tmp_path):
    cfg = quick_config(epochs=2, max_train_images=64, **{"tta.views": "none"})
    command = [sys.executable, "-m", "kit", "train-all", "--parallel", "2", "--config", "configs/demo.yaml",
               "--data-dir", cfg.data_dir, "--out", cfg.out_dir, "folds.n_splits=2", "epochs=2",
               "max_train_images=64", "batch_size=32", "tta.views=none"]
    hook, marks = tmp_path / "hook", tmp_path / "marks"
    hook.mkdir()
    marks.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_AFTER_EPOCH_1)
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONPATH=str(hook), KIT_TEST_MARKS=str(marks)),
                           preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 300
        while sorted(path.name for path in marks.iterdir()) != ["fold0", "fold1"]:
            assert time.monotonic() < deadline and run.poll() is None, "both folds should have saved epoch 1"
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)            # what a terminal sends to the whole process group
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("interrupted: folds 0, 1 stopped; every fold keeps its finished epochs; "
                                            "rerun the same command to resume")
    for fold in (0, 1):
        assert load_checkpoint(fold_dir(cfg, fold) / "last.pt")["epoch"] == 1
        assert not (fold_dir(cfg, fold) / "metrics.json").is_file()
        assert f"interrupted in epoch 2 of fold {fold}: epoch 1 is saved" in \
            (experiment_dir(cfg) / f"fold{fold}.log").read_text()

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    for fold in (0, 1):
        assert json.loads((fold_dir(cfg, fold) / "metrics.json").read_text())["epochs_trained"] == 2
        assert "resuming after epoch 1" in (experiment_dir(cfg) / f"fold{fold}.log").read_text()


def children_of(pid: int) -> list[int]:
    """The processes `pid` started (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def start_parallel_run(cfg, name: str) -> tuple[subprocess.Popen, dict[int, int]]:
    """`train-all PARALLEL=2` of experiment `name` in the background, as soon as both fold workers exist; returns
    the parent and its workers by fold."""
    command = [sys.executable, "-m", "kit", "train-all", "--parallel", "2", "--config", "configs/demo.yaml",
               "--data-dir", cfg.data_dir, "--out", cfg.out_dir, f"name={name}", "folds.n_splits=2", "epochs=1",
               "max_train_images=32", "batch_size=32", "tta.views=none"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers = {}
    while len(workers) < 2:
        assert time.monotonic() < deadline and run.poll() is None, "both folds should have started"
        for child in children_of(run.pid):
            arguments = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"--fold" in arguments:
                workers[int(arguments[arguments.index(b"--fold") + 1])] = child
        time.sleep(0.05)
    return run, workers


@pytest.mark.slow
def test_a_killed_worker_is_named_and_a_killed_parent_takes_its_workers_with_it(quick_config):
    cfg = quick_config()

    # a worker killed (as the out-of-memory killer would): its fold is named with how it ended
    run, workers = start_parallel_run(cfg, "oom")
    os.kill(workers[1], signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2 and "Traceback" not in err, err
    assert "fold 1 failed" in err and "the worker was killed by SIGKILL (the out-of-memory killer, or kill -9)" in err

    # the parent killed: its workers stop with it, so nothing is left "being trained"
    run, workers = start_parallel_run(cfg, "orphans")
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers.values()):
        assert time.monotonic() < deadline, "workers outlived their parent"
        time.sleep(0.2)
    for fold in (0, 1):
        with fold_lock(cfg_named(cfg, "orphans"), fold):      # free at once: no live holder
            pass


def cfg_named(cfg, name: str):
    from kit.config import apply_overrides

    return apply_overrides(cfg, {"name": name})


def test_two_parallel_runs_of_one_experiment_are_refused(quick_config):
    cfg = quick_config(epochs=1)
    with lock_held_elsewhere(experiment_dir(cfg) / "train-all.lock") as holder:
        with pytest.raises(KitError, match=rf"`make train-all PARALLEL=…` of `demo` is already running \(PID "
                                           rf"{holder.pid} .*wait for it to end or stop it, then rerun"):
            api.train_all(cfg, parallel=2, log=lambda *_: None)
    assert not (experiment_dir(cfg) / "fold0.log").exists(), "no worker started"


def test_workers_get_the_parents_own_gpus(monkeypatch):
    from kit import parallel

    monkeypatch.setattr(parallel.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(parallel.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [parallel.slot_environment(slot, 2)["CUDA_VISIBLE_DEVICES"] for slot in range(3)] == ["2", "3", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa, GPU-bbbb")
    assert [parallel.slot_environment(slot, 2)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [parallel.slot_environment(slot, 2)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["0", "1"]
