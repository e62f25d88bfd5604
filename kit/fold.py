"""One fold's lifecycle, written once: lock, plan (skip, resume or start afresh, as kit/runs.py's rules decide), the
fold's data, the epoch loop (train, validate, keep the best, save, early stopping), interruption, discard, and the
fold's results (oof.csv, metrics.json). It runs one of two training methods:

  FineTuning             (kit/engine.py)    the model trained on images
  HeadOnFrozenFeatures   (kit/features.py)  only the head, on a frozen backbone's cached features

A method is built from the config, the fold number and the training set (read once) without touching the run
folder, holds `model`, `device`, `amp_dtype`, `data` (the fold's `FoldData`), `plateau_loss`, and answers:

  describe(log)                          the lines that say what will train
  clock_work()                           what the fold clock needs beyond the epochs
  start_epoch(epoch, seed)               seed the epoch's batches and randomness, freeze or unfreeze
  train_epoch(epoch, desc, on_check)     one pass over the training batches → (train loss, items per second)
  validation_logits()                    the held-out rows' logits of the weights being kept
  keep_best(run, epoch, val_auc)         this epoch is the best so far: keep its weights
  resume_state() / load_resume_state()   the method's part of last.pt (kit/checkpoints.py builds the rest)
  finish(run, progress, log)             best.pt's held-out TTA probabilities, and the method's metrics entries

Under torchrun (`make train NPROC=N`) every rank runs this: rank 0 takes the lock, decides, logs and writes; the
others follow its decision and train their share (kit/distributed.py).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from . import distributed
from .checkpoints import FoldProgress, read_resume, resume_process_count, resume_progress, save_resume
from .config import Config
from .data import check_test_images
from .device import peak_memory_mb, select_device
from .engine import FineTuning
from .errors import Interrupted, KitError
from .experiment import check_split_against_data
from .features import HeadOnFrozenFeatures
from .fold_data import TrainingSet, check_fold_number, prepare_shared, read_training_set
from .inference import tta_view_count
from .io import require_writable_dir
from .kaggle_notebook import in_kaggle_notebook
from .models import count_parameters
from .progress import FoldClock, FoldWork, say
from .recipe import head_lr, is_stalled, stall_warning, validation_loss
from .runs import LAST, FoldRun, fold_lock
from .tracking import Trackers, open_trackers

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds", "peak_memory_mb"]


def training_method(cfg: Config):
    """The method `train.frozen_features` chooses."""
    return HeadOnFrozenFeatures if cfg.train.frozen_features else FineTuning


# ----------------------------------------------------------------------------------------------------------------
# Plan: what the run folder's rules say to do
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class FoldPlan:
    """What rank 0 decided to do with a fold's run folder (every rank follows it)."""
    finished: dict | None = None       # metrics of a fold already finished under this config: nothing to train
    state: dict | None = None          # last.pt to resume from
    extension: tuple | None = None     # (old, new) epochs when a raised `epochs` continues the run
    keep_existing: bool = False        # FORCE=1 over a trained fold: stage the new run beside it


def plan_fold(cfg: Config, run: FoldRun, training: TrainingSet, force: bool, world: int) -> FoldPlan:
    """Resume, skip or start afresh, as the run folder's rules decide (`FoldRun.decide`); run holding the fold's
    lock."""
    run.recover_from_crash()
    decision = run.decide(force)
    if not force:
        check_split_against_data(cfg, labels=training.labels)   # every fold on the split of today's labels
    if decision.action == "skip":
        return FoldPlan(finished=decision.status.metrics)
    check_test_images(training.data_dir)         # a missing test image fails now, not after hours of training
    if decision.action == "fresh":
        return FoldPlan(keep_existing=decision.replaces)
    state = read_resume(run, training_method(cfg).kind)
    trained_by = resume_process_count(state)
    if trained_by != world:
        raise KitError(f"{run.label} was being trained by {trained_by} process(es) (NPROC={trained_by}), not "
                       f"{world}: each process's share of a batch and its augmentations depend on the count; resume "
                       f"with NPROC={trained_by}, or retrain it with FORCE=1")
    return FoldPlan(state=state, extension=decision.extension)


# ----------------------------------------------------------------------------------------------------------------
# The lifecycle
# ----------------------------------------------------------------------------------------------------------------

def train_fold(cfg: Config, fold: int, force: bool = False, on_epoch_end=None, log=say, folds_after: int = 0) -> dict:
    """Train (or resume) one fold; return its metrics.

    A finished fold is returned as is, and a fold trained with another config is refused (naming the keys),
    unless `force`: then everything is checked first, and the old fold is replaced only once the new run has
    written its first checkpoint. `on_epoch_end(epoch, row)` runs after each epoch's files are saved (tests use
    it to interrupt a run). `folds_after`: the experiment's folds still to train after this one (train-all), for
    the time estimate (`progress.FoldClock`).
    """
    started = time.perf_counter()
    check_fold_number(cfg, fold)
    ranks = distributed.start(select_device(cfg.device))
    log = log if ranks.is_main else distributed.quiet
    run = FoldRun(cfg, fold, writes=ranks.is_main)
    training = read_training_set(cfg)             # the data folder checked and the labels read, once
    with ExitStack() as held:
        def lock_and_plan() -> FoldPlan:
            require_writable_dir(cfg.out_dir)         # a read-only OUT, or a file there, fails now, not after an epoch
            held.enter_context(fold_lock(cfg, fold))
            return plan_fold(cfg, run, training, force, ranks.world)

        plan = distributed.from_main(lock_and_plan)
        if plan.finished is not None:
            metrics = plan.finished
            log(f"{cfg.name} fold {fold}: already trained (best val AUC {metrics['best_val_auc']:.4f} at epoch "
                f"{metrics['best_epoch']}); pass FORCE=1 to train it again")
            return metrics
        # a missing tracker package fails now, before any training; their runs end however the fold ends
        trackers = held.enter_context(open_trackers(cfg, fold, run.final_dir, log))
        if ranks.active:      # rank 0 builds what all share (with its progress bar) while the others wait
            distributed.from_main(lambda: prepare_shared(cfg, log))
        method = training_method(cfg)(cfg, fold, training, log)
        progress = FoldProgress()
        if plan.state is not None:
            method.load_resume_state(plan.state)
            progress = resume_progress(plan.state)
            log(f"{cfg.name} fold {fold}: resuming after epoch {progress.epoch} (best val AUC "
                f"{progress.best_auc:.4f})" + (f"; epochs raised {plan.extension[0]} → {plan.extension[1]}"
                                               if plan.extension else ""))
        else:
            run.start_fresh(keep_existing=plan.keep_existing)
        try:
            run.write_identity(method.data.split.record, plan.extension if plan.state is not None else None)
            method.describe(log)
            clock = FoldClock(FoldWork(epochs_left=cfg.epochs - progress.epoch, epochs=cfg.epochs,
                                       folds_after=folds_after, **method.clock_work()),
                              f"{cfg.name} fold {fold}", log, started=started, in_kaggle=in_kaggle_notebook())
            progress.stopped_early = run_epochs(cfg, fold, run, method, progress, on_epoch_end, log, clock, trackers)
            probabilities, entries = method.finish(run, progress, log)
            metrics = write_fold_results(cfg, fold, run, method, progress, probabilities, log, **entries)
            trackers.finish(progress.history, metrics)
            # every rank leaves once rank 0 has written the fold's files (train-all reads them next)
            return distributed.from_main(lambda: metrics)
        except KeyboardInterrupt as err:
            staged = run.directory == run.staging_dir
            run.discard_staging()     # a FORCE=1 retrain stopped before its first checkpoint: the old fold stands
            raise err if isinstance(err, Interrupted) else interrupted_fold(cfg, fold, run, progress, staged) from None
        except BaseException:
            run.discard_staging()
            raise


def run_epochs(cfg: Config, fold: int, run: FoldRun, method, progress: FoldProgress, on_epoch_end, log,
               clock: FoldClock, trackers: Trackers) -> bool:
    """Train and validate epoch by epoch, saving after each; return whether early stopping ended the run. `clock`
    times the steps and validations and says how long the fold will take."""
    ranks = distributed.current()
    valid_labels = method.data.valid_labels
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        # the same batches, views and dropout whether resumed or not
        method.start_epoch(epoch, cfg.seed * 1_000_003 + fold * 10_007 + epoch)
        started = time.perf_counter()
        clock.epoch_started()
        train_loss, per_s = method.train_epoch(epoch, f"fold {fold} epoch {epoch}/{cfg.epochs}" if ranks.is_main
                                               else None, clock.on_check)
        validation_started = time.perf_counter()
        valid_logits = method.validation_logits()
        clock.validated(time.perf_counter() - validation_started)
        row = {"epoch": epoch, "train_loss": train_loss,
               "val_loss": validation_loss(method.parts.loss_fn, valid_logits, valid_labels, method.device),
               "val_auc": float(roc_auc_score(valid_labels, valid_logits)), "lr": head_lr(method.parts.optimizer),
               "images_per_s": per_s, "seconds": time.perf_counter() - started,
               "peak_memory_mb": peak_memory_mb(method.device)}
        improved = progress.is_better(row)
        progress.history.append(row)
        if improved:
            progress.best_auc, progress.best_epoch = row["val_auc"], epoch
            method.keep_best(run, epoch, row["val_auc"])
        run.write_history(progress.history, HISTORY_COLUMNS)
        progress.epoch = epoch
        save_resume(run, cfg, method.kind, method.resume_state(), method.amp_dtype, ranks.world, progress)
        run.commit_staging()           # FORCE=1: the new run has a checkpoint now, so it replaces the old fold
        trackers.log_epochs(progress.history)     # after the checkpoint: the fold's folder stays where it is now
        log(f"fold {fold} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}{'  (best)' if improved else ''}  {per_s:,.0f} {method.speed_unit}  "
            f"{row['seconds']:.0f}s" + (f"  peak {row['peak_memory_mb']:,.0f} MB" if row["peak_memory_mb"] else "")
            + clock.epoch_ended(row["seconds"]))
        warning = stall_warning(cfg, fold, epoch, train_loss, method.plateau_loss, method.stall_advice,
                                steps=epoch * len(method.batches))
        if warning:
            log(warning)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if cfg.train.early_stopping and epoch - progress.best_epoch >= cfg.train.early_stopping:
            log(f"fold {fold}: no better val AUC for {cfg.train.early_stopping} epochs; stopping early")
            return True
    return False


def interrupted_fold(cfg: Config, fold: int, run: FoldRun, progress: FoldProgress, staged: bool) -> Interrupted:
    """Ctrl-C during a fold: what its run folder now holds, and what rerunning the command does."""
    saved = progress.epoch
    if saved == 0:
        kept = " (the fold trained before stays as it was)" if staged else ""
        return Interrupted(f"interrupted in the first epoch of fold {fold}: nothing of this run was saved{kept}; "
                           f"rerun the same command to start it")
    if saved >= cfg.epochs or progress.stopped_early:
        return Interrupted(f"interrupted while finishing fold {fold}: every epoch is saved in {run.path(LAST)}; "
                           f"rerun the same command to finish it (out-of-fold predictions and metrics)")
    epochs = "epoch 1 is" if saved == 1 else f"epochs 1–{saved} are"
    return Interrupted(f"interrupted in epoch {saved + 1} of fold {fold}: {epochs} saved in {run.path(LAST)}; "
                       f"rerun the same command to resume from epoch {saved + 1}")


def write_fold_results(cfg: Config, fold: int, run: FoldRun, method, progress: FoldProgress,
                       probabilities: np.ndarray, log, **entries) -> dict:
    """oof.csv (the held-out rows' TTA probabilities), then metrics.json: the fold is finished. `entries` are the
    training method's own metrics (SWA's, the TTA pass's peak, frozen features')."""
    data = method.data
    oof_auc = float(roc_auc_score(data.valid_labels, probabilities))
    run.write_oof(pd.DataFrame({"id": data.ids[data.valid_rows], "label": data.valid_labels, "pred": probabilities}))
    metrics = {"experiment": cfg.name, "fold": fold, "best_val_auc": progress.best_auc,
               "best_epoch": progress.best_epoch, "oof_auc": oof_auc, "tta": cfg.tta.views,
               "tta_views": tta_view_count(cfg.tta.views), "epochs_trained": len(progress.history),
               "stopped_early": progress.stopped_early, "train_images": int(len(data.train_rows)),
               "valid_images": int(len(data.valid_rows)), "model": cfg.model.name,
               "parameters": count_parameters(method.model), "device": str(method.device), "processes": 1,
               "ema": bool(cfg.train.ema_decay), "swa_val_auc": None, "swa_bn_seconds": None,
               "swa_bn_peak_memory_mb": None, "tta_peak_memory_mb": None, "plateau_loss": method.plateau_loss,
               "stalled": is_stalled(progress.history[-1]["train_loss"], method.plateau_loss), **entries}
    run.write_metrics(metrics)
    log(f"{cfg.name} fold {fold}: done, best val AUC {progress.best_auc:.4f} at epoch {progress.best_epoch}; "
        f"OOF AUC with {tta_view_count(cfg.tta.views)} TTA views {oof_auc:.4f} → {run.directory}")
    return metrics
