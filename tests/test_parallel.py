"""Fold-parallel training (`make train-all PARALLEL=N`): folds in worker processes, shared data built once, the fold
lock respected, a failed fold named while the others finish, Ctrl-C that stops all and resumes."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kit import api
from kit.data import cache_dir_for
from kit.errors import KitError
from kit.parallel import prepare_shared, resolve_parallel
from kit.runs import experiment_dir, fold_dir

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
    assert len(pooled) == 600 and cv_auc == pytest.approx(roc_auc_score(pooled["label"], pooled["pred"]))
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


def test_ctrl_c_stops_every_worker_and_the_rerun_resumes_each_fold(quick_config):
    cfg = quick_config(epochs=3, max_train_images=64, **{"tta.views": "none"})
    command = [sys.executable, "-m", "kit", "train-all", "--parallel", "2", "--config", "configs/demo.yaml",
               "--data-dir", cfg.data_dir, "--out", cfg.out_dir, "folds.n_splits=2", "epochs=3",
               "max_train_images=64", "batch_size=32", "tta.views=none"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=as_from_a_terminal)
    logs = [experiment_dir(cfg) / f"fold{fold}.log" for fold in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while not all(log.is_file() and "epoch 1/3: train_loss" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and run.poll() is None, "both folds should have started"
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)            # what a terminal sends to the whole process group
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: folds ")
    saved = [fold for fold in (0, 1) if (fold_dir(cfg, fold) / "last.pt").is_file()]
    assert saved and not any((fold_dir(cfg, fold) / "metrics.json").is_file() for fold in (0, 1))

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert all((fold_dir(cfg, fold) / "metrics.json").is_file() for fold in (0, 1))
    for fold in saved:
        assert "resuming after epoch" in (experiment_dir(cfg) / f"fold{fold}.log").read_text()
