"""One fold's lifecycle and its epoch loop: set up (model, data, input path, DDP), resume or start, train and
validate epoch by epoch, finish (SWA, the out-of-fold predictions, metrics.json).

It takes ready parts from the modules that own them: the recipe (optimizer, schedule, loss, EMA, freezing, one pass
over the batches) from kit/recipe.py, a model's outputs from kit/inference.py, the two checkpoints from
kit/checkpoints.py. What a fold leaves on disk, and every rule about it (finished, config-checked resume, FORCE, the
lock), belongs to kit/runs.py; this module asks it.
"""

from __future__ import annotations

import copy
import os
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, update_bn

from . import distributed
from .augment import build_transform, choose_input
from .checkpoints import FoldProgress, best_weights, load_resume, resume_process_count, save_best, save_resume
from .config import Config
from .data import (
    AlbumentationsBatches,
    CachedBatches,
    cache_dir_for,
    check_data_dir,
    check_test_images,
    load_split_images,
    read_train_labels,
    resident_images,
)
from .device import autocast_dtype, card_name, peak_memory_mb, precision_name, reset_peak_memory, select_device
from .errors import Interrupted, KitError
from .folds import Split, load_split
from .inference import predict_logits, predict_tta_probabilities, tta_view_count
from .io import require_writable_dir
from .kaggle_notebook import in_kaggle_notebook
from .models import build_model, count_parameters, start_head_neutral
from .progress import FoldClock, FoldWork
from .recipe import (
    MAX_WARMUP_SHARE,
    TrainingParts,
    build_training_parts,
    constant_prediction_loss,
    head_lr,
    hold_backbone,
    is_stalled,
    set_backbone_trainable,
    stall_warning,
    train_one_epoch,
    validation_loss,
    warmup_steps,
)
from .runs import BEST, LAST, FoldRun, check_split_against_data, fold_lock
from .tracking import Trackers, open_trackers

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds", "peak_memory_mb"]


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_training_input(cfg: Config, data: FoldData, images, device: torch.device):
    """The fold's training batches on the path `train.input` chooses, and a line for the log saying which and why.

    `images` is the train split, resident in GPU memory when it fits (`resident_images`).
    """
    transform = build_transform(cfg.augment.train, "augment.train")
    choice = choose_input(cfg.train.input, transform, "augment.train")
    labels = data.labels[data.train_rows]
    if choice.path == "batch":
        where = "in GPU memory" if isinstance(images, torch.Tensor) else "from the memory-mapped cache"
        batches = CachedBatches(images, data.train_rows, labels, cfg.batch_size, device, choice.augment,
                                cfg.train.channels_last)
        return batches, f"input: uint8 batches {where}, augmented a batch at a time on {device.type} ({choice.why})"
    workers = resolve_num_workers(cfg.num_workers, device)
    batches = AlbumentationsBatches(data.images, data.train_rows, labels, transform, cfg.batch_size, device, workers,
                                    cfg.train.channels_last)
    return batches, f"input: albumentations per image, {workers} DataLoader workers ({choice.why})"


def resolve_num_workers(requested: int, device: torch.device) -> int:
    if requested >= 0:
        return requested
    # on CPU the model is the bottleneck and workers would take its cores; on GPU decode/augment in parallel
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------------
# One fold
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class FoldData:
    ids: np.ndarray              # every training id, in train_labels.csv order
    labels: np.ndarray           # 0/1 per id
    images: np.ndarray           # (N, 96, 96, 3) uint8, memory-mapped cache
    train_rows: np.ndarray       # rows of this fold's training part
    valid_rows: np.ndarray       # rows of this fold's held-out part
    split: Split                 # the k-fold split these rows come from (recorded in the run folder)


def prepare_fold_data(cfg: Config, fold: int) -> FoldData:
    """Labels, folds and the image cache for one fold (cached images are shared by every fold)."""
    if fold < 0 or fold >= cfg.folds.n_splits:
        raise KitError(f"fold {fold} does not exist: folds.n_splits is {cfg.folds.n_splits} "
                       f"(folds 0..{cfg.folds.n_splits - 1})")
    data_dir = check_data_dir(cfg.data_dir)
    labels = read_train_labels(data_dir)
    split = load_split(labels, cfg.folds, Path(cfg.out_dir) / "folds")
    images = load_split_images(data_dir, "train", labels["id"], cache_dir_for(cfg, data_dir))
    fold_of_row = split.folds["fold"].to_numpy()
    train_rows = np.flatnonzero(fold_of_row != fold)
    if cfg.max_train_images:
        train_rows = train_rows[: cfg.max_train_images]
    return FoldData(ids=labels["id"].to_numpy(), labels=labels["label"].to_numpy(), images=images,
                    train_rows=train_rows, valid_rows=np.flatnonzero(fold_of_row == fold), split=split)


def prepare_shared(cfg: Config, log) -> None:
    """The fold file and the train cache, built once before the processes that share them start training
    (`train-all PARALLEL=N` workers, DDP ranks), so that none of them builds them while the others wait."""
    data_dir = check_data_dir(cfg.data_dir)
    labels = read_train_labels(data_dir)
    load_split(labels, cfg.folds, Path(cfg.out_dir) / "folds")
    images = load_split_images(data_dir, "train", labels["id"], cache_dir_for(cfg, data_dir))
    log(f"shared by the processes: the fold file and the train cache ({len(images):,} images)")


@dataclass
class FoldSetup:
    """Everything a fold's epochs need, built before the run folder is touched (so a bad name, file or value
    fails before FORCE=1 replaces anything)."""
    device: torch.device
    amp_dtype: torch.dtype | None
    model: nn.Module             # the weights being trained
    step_model: nn.Module        # the same weights, compiled when train.compile
    data: FoldData
    images: object               # the train split: a GPU tensor when it fits, else the memory-mapped cache
    batches: object
    parts: TrainingParts
    valid_transform: object
    input_line: str
    plateau_loss: float          # the train loss of predicting the prior for every patch (the stall detector's mark)
    swa: AveragedModel | None = None   # train.swa_epochs: the running average of the last epochs' weights


def set_up_fold(cfg: Config, fold: int) -> FoldSetup:
    """Model, data and optimisation for one fold; touches no run folder (FORCE=1 relies on that).

    Under DDP every rank builds the same model (same seed) and the same data; `wrap_step_model` then joins them."""
    # the model first: a bad name or missing weights fails in seconds, before a long first cache build
    device = select_device(cfg.device)
    ranks = distributed.current()
    if ranks.active:
        check_ddp_config(cfg, device, ranks.world)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())     # this rank's GPU (LOCAL_RANK)
    amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype)
    seed_everything(cfg.seed * 1000 + fold)
    model = build_model(cfg.model)
    if ranks.active and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.train.compile and not ranks.active else model   # compiles on first use
    valid_transform = build_transform(cfg.augment.valid, "augment.valid")
    data = prepare_fold_data(cfg, fold)
    train_labels = data.labels[data.train_rows]
    start_head_neutral(model, float(train_labels.mean()))   # first prediction = the prior (resume loads weights)
    images = resident_images(data.images, device)        # the whole split in GPU memory when it fits
    batches, input_line = build_training_input(cfg, data, images, device)
    parts = build_training_parts(cfg, model, len(batches), amp_dtype)
    return FoldSetup(device, amp_dtype, model, step_model, data, images, batches, parts, valid_transform, input_line,
                     constant_prediction_loss(cfg.loss, train_labels),
                     AveragedModel(model) if cfg.train.swa_epochs else None)


def check_ddp_config(cfg: Config, device: torch.device, world: int) -> None:
    """What DDP needs of the config: a batch that splits evenly over the ranks, SyncBatchNorm only on GPUs."""
    if cfg.batch_size % world:
        raise KitError(f"batch_size {cfg.batch_size} does not split over {world} processes (NPROC={world}): "
                       f"batch_size is the whole step's batch, so use a multiple of {world}")
    if cfg.train.sync_bn and device.type != "cuda":
        raise KitError("train.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel): drop it on the CPU")


def wrap_step_model(cfg: Config, setup: FoldSetup) -> None:
    """Under DDP the training steps go through DistributedDataParallel (it averages the gradients over the ranks
    and starts every rank from rank 0's weights); EMA, SWA and checkpoints keep using `setup.model` itself.
    Compiled after wrapping, as PyTorch recommends."""
    if not distributed.current().active:
        return
    device = setup.device
    step_model = DistributedDataParallel(setup.model, device_ids=[device.index] if device.type == "cuda" else None)
    setup.step_model = torch.compile(step_model) if cfg.train.compile else step_model


@dataclass
class FoldPlan:
    """What rank 0 decided to do with a fold's run folder (every rank follows it)."""
    finished: dict | None = None       # metrics of a fold already finished under this config: nothing to train
    state: dict | None = None          # last.pt to resume from
    extension: tuple | None = None     # (old, new) epochs when a raised `epochs` continues the run
    keep_existing: bool = False        # FORCE=1 over a trained fold: stage the new run beside it


def plan_fold(cfg: Config, fold: int, run: FoldRun, force: bool, world: int) -> FoldPlan:
    """Resume, skip or start afresh, as the run folder's rules decide (`FoldRun.decide`); run holding the fold's
    lock."""
    run.recover_from_crash()
    decision = run.decide(force)
    if not force:
        check_split_against_data(cfg)     # every fold of the experiment on the split of today's labels
    if decision.action == "skip":
        return FoldPlan(finished=decision.status.metrics)
    check_test_images(check_data_dir(cfg.data_dir))    # a missing test image fails now, not after hours of training
    if decision.action == "fresh":
        return FoldPlan(keep_existing=decision.replaces)
    state = run.load_checkpoint(LAST)
    trained_by = resume_process_count(state)
    if trained_by != world:
        raise KitError(f"{run.label} was being trained by {trained_by} process(es) (NPROC={trained_by}), not "
                       f"{world}: each process's share of a batch and its augmentations depend on the count; resume "
                       f"with NPROC={trained_by}, or retrain it with FORCE=1")
    return FoldPlan(state=state, extension=decision.extension)


def train_fold(cfg: Config, fold: int, force: bool = False, on_epoch_end=None, log=print, folds_after: int = 0) -> dict:
    """Train (or resume) one fold; return its metrics.

    A finished fold is returned as is, and a fold trained with another config is refused (naming the keys),
    unless `force`: then everything is checked first, and the old fold is replaced only once the new run has
    written its first checkpoint. `on_epoch_end(epoch, row)` runs after each epoch's files are saved (tests use
    it to interrupt a run). `folds_after`: the experiment's folds still to train after this one (train-all), for
    the time estimate (`progress.FoldClock`).

    Under torchrun (`make train NPROC=N`) every rank runs this: rank 0 takes the lock, decides, logs and writes;
    the others follow its decision and train their share (kit/distributed.py).
    """
    started = time.perf_counter()
    ranks = distributed.start(select_device(cfg.device))
    log = log if ranks.is_main else distributed.quiet
    run = FoldRun(cfg, fold, writes=ranks.is_main)
    with ExitStack() as held:
        def lock_and_plan() -> FoldPlan:
            require_writable_dir(cfg.out_dir)         # a read-only OUT, or a file there, fails now, not after an epoch
            held.enter_context(fold_lock(cfg, fold))
            return plan_fold(cfg, fold, run, force, ranks.world)

        plan = distributed.from_main(lock_and_plan)
        if plan.finished is not None:
            metrics = plan.finished
            log(f"{cfg.name} fold {fold}: already trained (best val AUC {metrics['best_val_auc']:.4f} at epoch "
                f"{metrics['best_epoch']}); pass FORCE=1 to train it again")
            return metrics
        if cfg.train.frozen_features:       # the backbone's features cached, only the head trains (kit/features.py)
            from .features import train_head_fold

            return train_head_fold(cfg, fold, run, plan, log)
        # a missing tracker package fails now, before any training; their runs end however the fold ends
        trackers = held.enter_context(open_trackers(cfg, fold, run.final_dir, log))

        if ranks.active:      # rank 0 builds what all share (with its progress bar) while the others wait
            distributed.from_main(lambda: prepare_shared(cfg, log))
        setup = distributed.together(lambda: set_up_fold(cfg, fold))
        wrap_step_model(cfg, setup)
        progress = FoldProgress()
        if plan.state is not None:
            progress = load_resume(plan.state, setup.model, setup.parts, setup.swa)
            log(f"{cfg.name} fold {fold}: resuming after epoch {progress.epoch} (best val AUC "
                f"{progress.best_auc:.4f})" + (f"; epochs raised {plan.extension[0]} → {plan.extension[1]}"
                                               if plan.extension else ""))
        else:
            run.start_fresh(keep_existing=plan.keep_existing)
        try:
            run.write_identity(setup.data.split.record, plan.extension if plan.state is not None else None)
            describe_setup(cfg, fold, setup, log)
            clock = FoldClock(FoldWork(epochs_left=cfg.epochs - progress.epoch, epochs=cfg.epochs,
                                       train_images=len(setup.data.train_rows),
                                       valid_images=len(setup.data.valid_rows),
                                       tta_views=tta_view_count(cfg.tta.views), swa=bool(cfg.train.swa_epochs),
                                       folds_after=folds_after),
                              f"{cfg.name} fold {fold}", log, started=started, in_kaggle=in_kaggle_notebook())
            progress.stopped_early = run_epochs(cfg, fold, run, setup, progress, on_epoch_end, log, clock, trackers)
            metrics = finish_fold(cfg, fold, run, setup, progress, log)
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


def describe_setup(cfg: Config, fold: int, setup: FoldSetup, log) -> None:
    device = card_name(setup.device) if setup.device.type == "cuda" else "cpu"
    ranks = distributed.current()
    sync_bn = ", SyncBatchNorm" if cfg.train.sync_bn else ""
    processes = (f", {ranks.world} processes (DDP over {torch.distributed.get_backend()}, "
                 f"{cfg.batch_size // ranks.world} images each per step{sync_bn})" if ranks.active else "")
    log(f"{cfg.name} fold {fold}/{cfg.folds.n_splits - 1}: model {cfg.model.name}, "
        f"{count_parameters(setup.model):,} parameters, {len(setup.data.train_rows):,} train / "
        f"{len(setup.data.valid_rows):,} valid images, device {device}, {precision_name(setup.amp_dtype)}"
        f"{', compiled' if cfg.train.compile else ''}{processes}")
    log(setup.input_line)
    for note in getattr(setup.model, "notes", ()):      # what the model's build decided (kit/models.py)
        log(note)
    planned = round(cfg.schedule.warmup_epochs * len(setup.batches))
    if cfg.schedule.name != "onecycle" and planned > warmup_steps(cfg, len(setup.batches)):
        log(f"schedule: warm-up shortened from {cfg.schedule.warmup_epochs:g} epochs to "
            f"{warmup_steps(cfg, len(setup.batches))} steps ({MAX_WARMUP_SHARE:.0%} of the run)")


def predict_held_out(cfg: Config, setup: FoldSetup, model: nn.Module, views: str | None = None) -> np.ndarray:
    """The fold's held-out rows through `model`: logits, or with `views` the TTA-mean probability (what oof.csv
    holds). Under DDP each rank predicts its shard and every rank gets all the rows back, in order."""
    rows = distributed.shard(setup.data.valid_rows)
    options = dict(transform=setup.valid_transform, channels_last=cfg.train.channels_last)
    if views is None:
        local = predict_logits(model, setup.images, rows, cfg.eval_batch_size, setup.device, setup.amp_dtype,
                               **options)
    else:
        local = predict_tta_probabilities(model, setup.images, views, cfg.eval_batch_size, setup.device,
                                      setup.amp_dtype, rows=rows, **options)
    return distributed.gather_rows(local)


def run_epochs(cfg: Config, fold: int, run: FoldRun, setup: FoldSetup, progress: FoldProgress, on_epoch_end,
               log, clock: FoldClock, trackers: Trackers) -> bool:
    """Train and validate epoch by epoch, saving after each; return whether early stopping ended the run. `clock`
    times the steps and validations and says how long the fold will take."""
    model, parts, data = setup.model, setup.parts, setup.data
    ranks = distributed.current()
    # a fixed graph (compile) or DDP's gradient hooks must not see requires_grad change: freeze by a zero rate
    freeze_by_lr = cfg.train.compile or ranks.active
    valid_labels = data.labels[data.valid_rows]
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        epoch_seed = cfg.seed * 1_000_003 + fold * 10_007 + epoch   # same batches and views whether resumed or not
        setup.batches.set_seed(epoch_seed)
        torch.manual_seed(distributed.rank_seed(epoch_seed))   # dropout, drop-path: the CPU and every CUDA
        frozen = epoch <= cfg.train.freeze_backbone_epochs     # generator, so a resumed run draws what an
        if freeze_by_lr:                                       # uninterrupted one draws
            hold_backbone(parts.optimizer, parts.scheduler, held=frozen)    # no recompile at the unfreeze
        else:
            set_backbone_trainable(model, not frozen)                      # no backbone gradients: faster
        reset_peak_memory(setup.device)
        started = time.perf_counter()
        clock.epoch_started()
        train_loss, images_per_s = train_one_epoch(setup.step_model, setup.batches, parts, setup.device,
                                                   setup.amp_dtype, hold_backbone_lr=frozen and freeze_by_lr,
                                                   desc=f"fold {fold} epoch {epoch}/{cfg.epochs}" if ranks.is_main
                                                   else None, on_check=clock.on_check)
        if ranks.active:      # each rank's BatchNorm statistics followed its own share: rank 0's become everyone's
            distributed.copy_from_main(list(model.buffers()) +
                                       (list(parts.ema.module.buffers()) if parts.ema is not None else []))
        if setup.swa is not None and epoch > cfg.epochs - cfg.train.swa_epochs:
            setup.swa.update_parameters(model)
        evaluated = parts.ema.module if parts.ema is not None else model     # EMA weights are the ones kept
        validation_started = time.perf_counter()
        valid_logits = predict_held_out(cfg, setup, evaluated)
        clock.validated(time.perf_counter() - validation_started)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": validation_loss(parts.loss_fn, valid_logits, valid_labels, setup.device),
               "val_auc": float(roc_auc_score(valid_labels, valid_logits)), "lr": head_lr(parts.optimizer),
               "images_per_s": images_per_s, "seconds": time.perf_counter() - started,
               "peak_memory_mb": peak_memory_mb(setup.device)}
        progress.history.append(row)
        improved = row["val_auc"] > progress.best_auc
        if improved:
            progress.best_auc, progress.best_epoch = row["val_auc"], epoch
            save_best(run, cfg, fold, evaluated, epoch, row["val_auc"])
        run.write_history(progress.history, HISTORY_COLUMNS)
        progress.epoch = epoch
        save_resume(run, cfg, model, parts, setup.swa, setup.amp_dtype, ranks.world, progress)
        run.commit_staging()           # FORCE=1: the new run has a checkpoint now, so it replaces the old fold
        trackers.log_epochs(progress.history)     # after the checkpoint: the fold's folder stays where it is now
        log(f"fold {fold} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}{'  (best)' if improved else ''}  {images_per_s:,.0f} img/s  "
            f"{row['seconds']:.0f}s" + (f"  peak {row['peak_memory_mb']:,.0f} MB" if row["peak_memory_mb"] else "")
            + clock.epoch_ended(row["seconds"]))
        warning = stall_warning(cfg, fold, epoch, train_loss, setup.plateau_loss)
        if warning:
            log(warning)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if cfg.train.early_stopping and epoch - progress.best_epoch >= cfg.train.early_stopping:
            log(f"fold {fold}: no better val AUC for {cfg.train.early_stopping} epochs; stopping early")
            return True
    return False


SWA_BN_SEED = 7_777_777     # the training batches that recompute the averaged model's BatchNorm statistics


def finish_swa(cfg: Config, fold: int, run: FoldRun, setup: FoldSetup, log) -> dict:
    """Recompute the averaged weights' BatchNorm statistics on the training images (in the training precision),
    validate them, and keep them as best.pt (the SWA recipe's final model). Returns metrics.json's SWA entries:
    their val AUC, and the seconds and peak memory of the BatchNorm pass; empty when no epoch was averaged."""
    if int(setup.swa.n_averaged) == 0:
        log(f"fold {fold}: stopped before the last {cfg.train.swa_epochs} epochs: no SWA average; best.pt is the best "
            f"epoch")
        return {}
    setup.batches.set_seed(SWA_BN_SEED)
    reset_peak_memory(setup.device)
    started = time.perf_counter()
    # in the training precision: a full forward pass over the training split, fp32 would double it at 224 px
    with torch.autocast(setup.device.type, dtype=setup.amp_dtype, enabled=setup.amp_dtype is not None):
        update_bn(setup.batches, setup.swa)
    bn_pass = {"swa_bn_seconds": time.perf_counter() - started, "swa_bn_peak_memory_mb": peak_memory_mb(setup.device)}
    averaged = setup.swa.module
    distributed.average_across_ranks(averaged.buffers())     # DDP: each rank saw its share of every batch
    logits = predict_held_out(cfg, setup, averaged)
    auc = float(roc_auc_score(setup.data.labels[setup.data.valid_rows], logits))
    save_best(run, cfg, fold, averaged, cfg.epochs, auc, swa_epochs=int(setup.swa.n_averaged))
    log(f"fold {fold}: SWA over {int(setup.swa.n_averaged)} epochs: val AUC {auc:.4f} (kept as best.pt)")
    return {"swa_val_auc": auc, **bn_pass}


def finish_fold(cfg: Config, fold: int, run: FoldRun, setup: FoldSetup, progress: FoldProgress, log) -> dict:
    """Predict the held-out rows with best.pt and the configured TTA views (as the submission will), write
    oof.csv, then metrics.json: the fold is finished."""
    data = setup.data
    swa = finish_swa(cfg, fold, run, setup, log) if setup.swa is not None else {}
    best_model = copy.deepcopy(setup.parts.ema.module if setup.parts.ema is not None else setup.model)
    best_model.load_state_dict(distributed.from_main(lambda: best_weights(run.path(BEST))))
    reset_peak_memory(setup.device)             # the TTA pass (views stacked into one forward) has its own peak
    probabilities = predict_held_out(cfg, setup, best_model, views=cfg.tta.views)
    tta_peak = peak_memory_mb(setup.device)
    return write_fold_results(cfg, fold, run, data, progress, probabilities, setup.model, setup.device,
                              setup.plateau_loss, log, processes=distributed.current().world,
                              swa_val_auc=swa.get("swa_val_auc"), swa_bn_seconds=swa.get("swa_bn_seconds"),
                              swa_bn_peak_memory_mb=swa.get("swa_bn_peak_memory_mb"), tta_peak_memory_mb=tta_peak)


def write_fold_results(cfg: Config, fold: int, run: FoldRun, data: FoldData, progress: FoldProgress,
                       probabilities: np.ndarray, model: nn.Module, device: torch.device, plateau_loss: float,
                       log, **entries) -> dict:
    """oof.csv (the held-out rows' TTA probabilities), then metrics.json: the fold is finished. `entries` are the
    metrics of the way it was trained (SWA's, the TTA pass's peak, frozen features'). Both fold paths end here."""
    valid_labels = data.labels[data.valid_rows]
    oof_auc = float(roc_auc_score(valid_labels, probabilities))
    run.write_oof(pd.DataFrame({"id": data.ids[data.valid_rows], "label": valid_labels, "pred": probabilities}))
    metrics = {"experiment": cfg.name, "fold": fold, "best_val_auc": progress.best_auc,
               "best_epoch": progress.best_epoch, "oof_auc": oof_auc, "tta": cfg.tta.views,
               "tta_views": tta_view_count(cfg.tta.views), "epochs_trained": len(progress.history),
               "stopped_early": progress.stopped_early, "train_images": int(len(data.train_rows)),
               "valid_images": int(len(data.valid_rows)), "model": cfg.model.name,
               "parameters": count_parameters(model), "device": str(device), "processes": 1,
               "ema": bool(cfg.train.ema_decay), "swa_val_auc": None, "swa_bn_seconds": None,
               "swa_bn_peak_memory_mb": None, "tta_peak_memory_mb": None, "plateau_loss": plateau_loss,
               "stalled": is_stalled(progress.history[-1]["train_loss"], plateau_loss), **entries}
    run.write_metrics(metrics)
    log(f"{cfg.name} fold {fold}: done, best val AUC {progress.best_auc:.4f} at epoch {progress.best_epoch}; "
        f"OOF AUC with {tta_view_count(cfg.tta.views)} TTA views {oof_auc:.4f} → {run.directory}")
    return metrics
