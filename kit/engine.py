"""Fine-tuning, the first of the fold lifecycle's two training methods (kit/fold.py runs it): the whole model
(or its unfrozen part) trained on images, with the recipe's parts (optimizer, schedule, loss, EMA, freezing: kit/
recipe.py), an optional SWA average, under DDP when launched by torchrun.

`FineTuning` is built from ready objects (the config, the training set read once) without touching the run folder, and
answers the lifecycle's questions: train one epoch, the held-out logits, keep the best weights, the state to save
and to load, and the fold's held-out TTA probabilities at the end.
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, update_bn

from . import distributed
from .array_cache import resident_images
from .augment import build_transform, choose_input
from .batches import AlbumentationsBatches, CachedBatches
from .checkpoints import best_weights, save_best
from .config import Config
from .device import autocast_dtype, card_name, peak_memory_mb, precision_name, reset_peak_memory, select_device
from .errors import KitError
from .fold_data import FoldData, TrainingSet, fold_data
from .inference import predict_logits, predict_tta_probabilities, tta_view_count
from .models import build_model, count_parameters, start_head_neutral
from .progress import say
from .recipe import (
    MAX_WARMUP_SHARE,
    build_training_parts,
    constant_prediction_loss,
    hold_backbone,
    seed_everything,
    set_backbone_trainable,
    train_one_epoch,
    warmup_steps,
)
from .runs import BEST, FoldRun

METHOD = "fine-tune"          # last.pt's `method` (kit/checkpoints.py)
SWA_BN_SEED = 7_777_777       # the training batches that recompute the averaged model's BatchNorm statistics


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

def build_training_input(cfg: Config, data: FoldData, images, device: torch.device):
    """The fold's training batches on the path `train.input` chooses, and a line for the log saying which and why.

    `images` is the train split, resident in GPU memory when it fits (`resident_images`).
    """
    transform = build_transform(cfg.augment.train, "augment.train")
    choice = choose_input(cfg.train.input, transform, "augment.train")
    labels = data.train_labels
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


class FineTuning:
    """Model, data and optimisation for one fold; built before the run folder is touched (so a bad name, file or
    value fails before FORCE=1 replaces anything). Under DDP every rank builds the same model (same seed) and the
    same data, then DistributedDataParallel joins them."""

    kind = METHOD
    speed_unit = "img/s"
    stall_advice = None           # the recipe's own (kit/recipe.py: stall_warning)

    def __init__(self, cfg: Config, fold: int, training: TrainingSet, log=say):
        self.cfg, self.fold = cfg, fold
        distributed.together(lambda: self.set_up(training))
        self.join_ranks()

    def set_up(self, training: TrainingSet) -> None:
        cfg, fold = self.cfg, self.fold
        # the model first: a bad name or missing weights fails in seconds, before a long first cache build
        device = select_device(cfg.device)
        ranks = distributed.current()
        if ranks.active:
            check_ddp_config(cfg, device, ranks.world)
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())     # this rank's GPU (LOCAL_RANK)
        self.device = device
        self.amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype)
        seed_everything(cfg.seed * 1000 + fold)
        model = build_model(cfg.model)
        if ranks.active and cfg.train.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model                                  # the weights being trained
        # the same weights, compiled when train.compile (compiles on first use)
        self.step_model = torch.compile(model) if cfg.train.compile and not ranks.active else model
        self.valid_transform = build_transform(cfg.augment.valid, "augment.valid")
        self.data = data = fold_data(cfg, fold, training)          # after the model: a bad name fails in seconds
        start_head_neutral(model, float(data.train_labels.mean()))   # first prediction = the prior
        self.images = resident_images(data.images, device)       # the whole split in GPU memory when it fits
        self.batches, self.input_line = build_training_input(cfg, data, self.images, device)
        self.parts = build_training_parts(cfg, model, len(self.batches), self.amp_dtype)
        # the train loss of predicting the prior for every patch (the stall detector's mark)
        self.plateau_loss = constant_prediction_loss(cfg.loss, data.train_labels)
        # train.swa_epochs: the running average of the last epochs' weights
        self.swa = AveragedModel(model) if cfg.train.swa_epochs else None
        # a fixed graph (compile) or DDP's gradient hooks must not see requires_grad change: freeze by a zero rate
        self.freeze_by_lr = cfg.train.compile or ranks.active
        self.frozen = False

    def join_ranks(self) -> None:
        """Under DDP the training steps go through DistributedDataParallel (it averages the gradients over the
        ranks and starts every rank from rank 0's weights); EMA, SWA and checkpoints keep using `self.model`
        itself. Compiled after wrapping, as PyTorch recommends."""
        if not distributed.current().active:
            return
        device = self.device
        step_model = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_model = torch.compile(step_model) if self.cfg.train.compile else step_model

    # ---- what the lifecycle asks ----------------------------------------------------------------------------

    def describe(self, log) -> None:
        cfg, data = self.cfg, self.data
        device = card_name(self.device) if self.device.type == "cuda" else "cpu"
        ranks = distributed.current()
        sync_bn = ", SyncBatchNorm" if cfg.train.sync_bn else ""
        processes = (f", {ranks.world} processes (DDP over {torch.distributed.get_backend()}, "
                     f"{cfg.batch_size // ranks.world} images each per step{sync_bn})" if ranks.active else "")
        log(f"{cfg.name} fold {self.fold} (of 0–{cfg.folds.n_splits - 1}): model {cfg.model.name}, "
            f"{count_parameters(self.model):,} parameters, {len(data.train_rows):,} train / "
            f"{len(data.valid_rows):,} valid images, device {device}, {precision_name(self.amp_dtype)}"
            f"{', compiled' if cfg.train.compile else ''}{processes}")
        log(self.input_line)
        for note in getattr(self.model, "notes", ()):      # what the model's build decided (kit/models.py)
            log(note)
        planned = round(cfg.schedule.warmup_epochs * len(self.batches))
        if cfg.schedule.name != "onecycle" and planned > warmup_steps(cfg, len(self.batches)):
            log(f"schedule: warm-up shortened from {cfg.schedule.warmup_epochs:g} epochs to "
                f"{warmup_steps(cfg, len(self.batches))} steps ({MAX_WARMUP_SHARE:.0%} of the run)")

    @property
    def evaluated_model(self) -> nn.Module:
        return self.parts.ema.module if self.parts.ema is not None else self.model     # EMA weights are the ones kept

    def start_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.batches.set_seed(epoch_seed)
        torch.manual_seed(distributed.rank_seed(epoch_seed))   # dropout, drop-path: the CPU and every CUDA generator,
        self.frozen = epoch <= self.cfg.train.freeze_backbone_epochs    # so a resumed run draws what an
        if self.freeze_by_lr:                                           # uninterrupted one draws
            hold_backbone(self.parts.optimizer, self.parts.scheduler, held=self.frozen)   # no recompile
        else:
            set_backbone_trainable(self.model, not self.frozen)                          # no backbone gradients
        reset_peak_memory(self.device)

    def train_epoch(self, epoch: int, desc: str | None, on_check) -> tuple[float, float]:
        parts = self.parts
        train_loss, images_per_s = train_one_epoch(self.step_model, self.batches, parts, self.device, self.amp_dtype,
                                                   hold_backbone_lr=self.frozen and self.freeze_by_lr, desc=desc,
                                                   on_check=on_check)
        if distributed.current().active:   # each rank's BatchNorm statistics followed its own share: rank 0's win
            distributed.copy_from_main(list(self.model.buffers()) +
                                       (list(parts.ema.module.buffers()) if parts.ema is not None else []))
        if self.swa is not None and epoch > self.cfg.epochs - self.cfg.train.swa_epochs:
            self.swa.update_parameters(self.model)
        return train_loss, images_per_s

    def validation_logits(self) -> np.ndarray:
        return self.predict_held_out(self.evaluated_model)

    def keep_best(self, run: FoldRun, epoch: int, val_auc: float) -> None:
        save_best(run, self.cfg, self.fold, self.evaluated_model, epoch, val_auc)

    def resume_state(self) -> dict:
        parts = self.parts
        return {"model": self.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                "ema": parts.ema.state_dict() if parts.ema is not None else None,
                "swa": self.swa.state_dict() if self.swa is not None else None}

    def load_resume_state(self, state: dict) -> None:
        parts = self.parts
        self.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and parts.scaler.is_enabled():    # a CPU or bf16 run saved `{}`: nothing to load
            parts.scaler.load_state_dict(state["scaler"])
        if parts.ema is not None and state.get("ema") is not None:
            parts.ema.load_state_dict(state["ema"])
        if self.swa is not None and state.get("swa") is not None:
            self.swa.load_state_dict(state["swa"])

    def finish(self, run: FoldRun, progress, log) -> tuple[np.ndarray, dict]:
        """SWA's average (when on), then best.pt's held-out predictions with the configured TTA views (as the
        submission will): oof.csv's probabilities, and this method's metrics.json entries."""
        swa = self.finish_swa(run, log) if self.swa is not None else {}
        best_model = copy.deepcopy(self.evaluated_model)
        best_model.load_state_dict(distributed.from_main(lambda: best_weights(run.path(BEST))))
        reset_peak_memory(self.device)             # the TTA pass (views stacked into one forward) has its own peak
        probabilities = self.predict_held_out(best_model, views=self.cfg.tta.views,
                                              desc=f"fold {self.fold} held-out × {tta_view_count(self.cfg.tta.views)} "
                                                   f"TTA views")
        return probabilities, {"processes": distributed.current().world, "swa_val_auc": swa.get("swa_val_auc"),
                               "swa_bn_seconds": swa.get("swa_bn_seconds"),
                               "swa_bn_peak_memory_mb": swa.get("swa_bn_peak_memory_mb"),
                               "tta_peak_memory_mb": peak_memory_mb(self.device)}

    # ---- inside ---------------------------------------------------------------------------------------------

    def predict_held_out(self, model: nn.Module, views: str | None = None, desc: str | None = None) -> np.ndarray:
        """The fold's held-out rows through `model`: logits, or with `views` the TTA-mean probability (what oof.csv
        holds); `desc`: a progress bar (rank 0's). Under DDP each rank predicts its shard and every rank gets all the
        rows back, in order."""
        cfg = self.cfg
        rows = distributed.shard(self.data.valid_rows)
        options = dict(transform=self.valid_transform, channels_last=cfg.train.channels_last,
                       desc=desc if distributed.current().is_main else None)
        if views is None:
            local = predict_logits(model, self.images, rows, cfg.eval_batch_size, self.device, self.amp_dtype,
                                   **options)
        else:
            local = predict_tta_probabilities(model, self.images, views, cfg.eval_batch_size, self.device,
                                              self.amp_dtype, rows=rows, **options)
        return distributed.gather_rows(local)

    def finish_swa(self, run: FoldRun, log) -> dict:
        """Recompute the averaged weights' BatchNorm statistics on the training images (in the training precision),
        validate them, and keep them as best.pt (the SWA recipe's final model). Returns metrics.json's SWA entries:
        their val AUC, and the seconds and peak memory of the BatchNorm pass; empty when no epoch was averaged."""
        cfg, swa = self.cfg, self.swa
        if int(swa.n_averaged) == 0:
            log(f"fold {self.fold}: stopped before the last {cfg.train.swa_epochs} epochs: no SWA average; best.pt "
                f"is the best epoch")
            return {}
        self.batches.set_seed(SWA_BN_SEED)
        reset_peak_memory(self.device)
        started = time.perf_counter()
        # in the training precision: a full forward pass over the training split, fp32 would double it at 224 px
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            update_bn(self.batches, swa)
        bn_pass = {"swa_bn_seconds": time.perf_counter() - started,
                   "swa_bn_peak_memory_mb": peak_memory_mb(self.device)}
        averaged = swa.module
        distributed.average_across_ranks(averaged.buffers())     # DDP: each rank saw its share of every batch
        auc = float(roc_auc_score(self.data.valid_labels, self.predict_held_out(averaged)))
        save_best(run, cfg, self.fold, averaged, cfg.epochs, auc, swa_epochs=int(swa.n_averaged))
        log(f"fold {self.fold}: SWA over {int(swa.n_averaged)} epochs: val AUC {auc:.4f} (kept as best.pt)")
        return {"swa_val_auc": auc, **bn_pass}

    def clock_work(self) -> dict:
        """What the fold clock (kit/progress.py) needs to know of this method's work beyond the epochs."""
        return {"train_images": len(self.data.train_rows), "valid_images": len(self.data.valid_rows),
                "tta_views": tta_view_count(self.cfg.tta.views), "swa": bool(self.cfg.train.swa_epochs)}


def check_ddp_config(cfg: Config, device: torch.device, world: int) -> None:
    """What DDP needs of the config: a batch that splits evenly over the ranks, SyncBatchNorm only on GPUs."""
    if cfg.batch_size % world:
        raise KitError(f"batch_size {cfg.batch_size} does not split over {world} processes (NPROC={world}): "
                       f"batch_size is the whole step's batch, so use a multiple of {world}")
    if cfg.train.sync_bn and device.type != "cuda":
        raise KitError("train.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel): drop it on the CPU")
