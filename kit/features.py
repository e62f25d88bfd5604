"""Frozen features (`train.frozen_features: true`): the head trained on a frozen backbone's cached features
(kit/feature_cache.py), one of the fold lifecycle's two training methods.

The fold contract is fine-tuning's (kit/runs.py's rules, kit/checkpoints.py's best.pt): best.pt holds the backbone
with the trained head in its classifier slot, so `make predict` and the Kaggle notebook run it on images, with the
TTA views averaged as probabilities, which is what oof.csv holds too. last.pt holds only the head's state.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from . import distributed
from .checkpoints import FoldProgress, save_best
from .config import Config, to_dict
from .data import batches_per_epoch, fits_resident
from .device import autocast_dtype, card_name, peak_memory_mb, precision_name, reset_peak_memory, select_device
from .engine import (
    HISTORY_COLUMNS,
    FoldData,
    interrupted_fold,
    prepare_fold_data,
    seed_everything,
    write_fold_results,
)
from .errors import Interrupted, KitError, SharedError
from .feature_cache import FeatureCache, cached_features, feature_width
from .models import (
    BASELINES,
    PatchClassifier,
    build_model,
    count_parameters,
    set_frozen_head,
    start_head_neutral,
)
from .recipe import (
    build_training_parts,
    constant_prediction_loss,
    head_lr,
    set_backbone_trainable,
    stall_warning,
    step_ema,
    train_one_epoch,
    validation_loss,
)
from .runs import LAST, FoldRun

# ----------------------------------------------------------------------------------------------------------------
# What the mode accepts
# ----------------------------------------------------------------------------------------------------------------

def check_frozen_config(cfg: Config) -> None:
    """One line for each option frozen features cannot honour, naming the key and what to set (the same on every
    rank of a torchrun launch: rank 0 alone prints it)."""
    model, train = cfg.model, cfg.train
    if model.name in BASELINES:
        raise SharedError(f"train.frozen_features needs a pretrained timm backbone, but `model.name: {model.name}` "
                          f"is the seed's CNN, which has no pretrained weights to freeze: set model.name to a timm "
                          f"model with model.pretrained=true or model.pretrained_file=…")
    if not model.pretrained and not model.pretrained_file:
        raise SharedError(f"train.frozen_features freezes the backbone's weights, but `{model.name}` would start "
                          f"from random weights (model.pretrained false, no model.pretrained_file): its features are "
                          f"noise; set model.pretrained=true or model.pretrained_file=path/to/weights")
    refused = {"train.swa_epochs": (train.swa_epochs, "0", "only the head trains: average its epochs with "
                                                             "train.ema_decay instead"),
               "train.freeze_backbone_epochs": (train.freeze_backbone_epochs, "0", "the backbone is frozen for "
                                                                                   "every epoch already"),
               "train.compile": (train.compile, "false", "the backbone runs once, the head is one small layer"),
               "model.trainable_blocks": (getattr(model, "trainable_blocks", 0), "0", "no block of the backbone "
                                                                                     "trains")}
    for key, (value, neutral, why) in refused.items():
        if value:
            raise SharedError(f"`{key}: {value}` does not combine with train.frozen_features ({why}): "
                              f"set {key}={neutral}")
    if distributed.current().active:
        raise SharedError(f"train.frozen_features trains a head in seconds on one process: run it without NPROC "
                          f"(NPROC={distributed.current().world})")


# ----------------------------------------------------------------------------------------------------------------
# Training the head on features
# ----------------------------------------------------------------------------------------------------------------

class HeadOnFeatures(nn.Module):
    """The classifier layer (or MLP) of the model, fed pooled features: one logit per row."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).reshape(-1)


class FeatureBatches:
    """Training batches of cached features: every (training row, TTA view) pair once an epoch, in an order drawn
    from the epoch's seed (the views are the only augmentation the head sees). Held on the device when they fit."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, batch_size: int, device: torch.device):
        views = features.shape[0]
        self.features = features.reshape(-1, features.shape[-1])           # view-major: (views × rows, F)
        if device.type == "cuda" and fits_resident(self.features.nbytes, device):
            self.features = self.features.to(device)
        self.labels = torch.as_tensor(np.tile(labels, views), dtype=torch.float32).to(device)
        self.batch_size, self.device, self.seed = batch_size, device, 0

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return batches_per_epoch(len(self.features), self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(self.seed))
        size = min(self.batch_size, len(self.features))
        for start in range(0, len(self) * size, size):
            picked = order[start:start + size]
            rows = picked.to(self.features.device, non_blocking=True)
            yield (self.features.index_select(0, rows).to(self.device, non_blocking=True).float(),
                   self.labels[picked.to(self.device, non_blocking=True)])


@torch.no_grad()
def head_logits(head: nn.Module, features: np.ndarray, device: torch.device, batch_size: int = 8192) -> np.ndarray:
    """The head's logits for rows of features (N, F)."""
    head.eval()
    outputs = [head(torch.from_numpy(np.asarray(features[start:start + batch_size], dtype=np.float32)).to(device))
               .reshape(-1).float() for start in range(0, len(features), batch_size)]
    return torch.cat(outputs).cpu().numpy() if outputs else np.empty(0, np.float32)


def tta_probabilities(head: nn.Module, view_features: list[np.ndarray], device: torch.device) -> np.ndarray:
    """The mean probability over the views: what best.pt with the TTA views gives on the images (kit/inference.py)."""
    return np.mean([1 / (1 + np.exp(-head_logits(head, f, device).astype(np.float64))) for f in view_features],
                   axis=0)


@dataclass
class HeadSetup:
    """What a fold's head epochs need, built before the run folder is touched."""
    device: torch.device
    amp_dtype: torch.dtype | None
    model: PatchClassifier       # the backbone with the head in its classifier slot (best.pt's model)
    step_model: HeadOnFeatures   # that head, fed features
    data: FoldData
    cache: FeatureCache
    valid_features: list[np.ndarray]   # per view: the held-out rows' features
    batches: FeatureBatches
    parts: object
    plateau_loss: float
    best_head: dict              # the best epoch's head weights (written into best.pt once the epochs are done)


def set_up_head(cfg: Config, fold: int, log) -> HeadSetup:
    """The model, the fold's rows, the features (computed on first need) and the head's recipe; no run folder."""
    check_frozen_config(cfg)
    device = select_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype)
    seed_everything(cfg.seed * 1000 + fold)
    model = set_frozen_head(build_model(cfg.model), cfg.train.frozen_head).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    set_backbone_trainable(model, False)
    data = prepare_fold_data(cfg, fold)
    train_labels = data.labels[data.train_rows]
    start_head_neutral(model, float(train_labels.mean()))
    cache = cached_features(cfg, model, data.images, device, amp_dtype, log)
    train_features = torch.from_numpy(np.stack([np.asarray(a[data.train_rows]) for a in cache.arrays]))
    batches = FeatureBatches(train_features, train_labels, cfg.batch_size, device)
    step_model = HeadOnFeatures(model.net.get_classifier())
    # the head trains in fp32 (it is tiny); its EMA averages the head alone, not a copy of the whole model
    no_ema = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=0.0))
    parts = build_training_parts(no_ema, model, len(batches), None)
    parts.ema = step_ema(step_model, cfg.train.ema_decay)
    return HeadSetup(device, amp_dtype, model, step_model, data, cache,
                     [np.asarray(a[data.valid_rows]) for a in cache.arrays], batches, parts,
                     constant_prediction_loss(cfg.loss, train_labels), copy.deepcopy(step_model.head.state_dict()))


def evaluated_head(setup: HeadSetup) -> nn.Module:
    return setup.parts.ema.module.head if setup.parts.ema is not None else setup.step_model.head


def save_head_resume(run: FoldRun, cfg: Config, setup: HeadSetup, progress: FoldProgress) -> None:
    """last.pt of a frozen-features fold: the head's state only (the backbone is in best.pt and the config)."""
    parts = setup.parts
    run.save_checkpoint(LAST, {
        "frozen_features": True, "head": setup.step_model.head.state_dict(), "best_head": setup.best_head,
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None, "torch_rng": torch.get_rng_state(),
        "amp_dtype": precision_name(setup.amp_dtype), "world_size": 1, "epoch": progress.epoch,
        "history": progress.history, "best_auc": progress.best_auc, "best_epoch": progress.best_epoch,
        "config": to_dict(cfg)})


def load_head_resume(state: dict, setup: HeadSetup, label: str) -> FoldProgress:
    if not state.get("frozen_features"):
        raise KitError(f"{label}'s last.pt was written by fine-tuning, not by train.frozen_features: retrain it "
                       f"with FORCE=1")
    setup.step_model.head.load_state_dict(state["head"])
    setup.parts.optimizer.load_state_dict(state["optimizer"])
    setup.parts.scheduler.load_state_dict(state["scheduler"])
    if setup.parts.ema is not None and state.get("ema") is not None:
        setup.parts.ema.load_state_dict(state["ema"])
    setup.best_head = state["best_head"]
    torch.set_rng_state(state["torch_rng"])
    return FoldProgress(history=state["history"], best_auc=state["best_auc"], best_epoch=state["best_epoch"],
                        epoch=state["epoch"])


def train_head_fold(cfg: Config, fold: int, run: FoldRun, plan, log=print) -> dict:
    """kit/engine.py's `train_fold` for `train.frozen_features`, after the run folder's rules decided (`plan`,
    holding the fold's lock): features from the cache, the head's epochs, then best.pt, oof.csv and metrics.json."""
    setup = set_up_head(cfg, fold, log)
    progress = FoldProgress()
    if plan.state is not None:
        progress = load_head_resume(plan.state, setup, run.label)
        log(f"{cfg.name} fold {fold}: resuming the head after epoch {progress.epoch} (best val AUC "
            f"{progress.best_auc:.4f})")
    else:
        run.start_fresh(keep_existing=plan.keep_existing)
    try:
        run.write_identity(setup.data.split.record, plan.extension if plan.state is not None else None)
        describe_head_setup(cfg, fold, setup, log)
        progress.stopped_early = run_head_epochs(cfg, fold, run, setup, progress, log)
        return finish_head_fold(cfg, fold, run, setup, progress, log)
    except KeyboardInterrupt as err:
        staged = run.directory == run.staging_dir
        run.discard_staging()
        raise err if isinstance(err, Interrupted) else interrupted_fold(cfg, fold, run, progress, staged) from None
    except BaseException:
        run.discard_staging()
        raise


def describe_head_setup(cfg: Config, fold: int, setup: HeadSetup, log) -> None:
    device = card_name(setup.device) if setup.device.type == "cuda" else "cpu"
    views = setup.cache.views
    log(f"{cfg.name} fold {fold}/{cfg.folds.n_splits - 1}: frozen features of {cfg.model.name} "
        f"({count_parameters(setup.model):,} parameters, {precision_name(setup.amp_dtype)}): "
        f"{feature_width(setup.model):,} features × {len(views)} view(s); {cfg.train.frozen_head} head "
        f"({count_parameters(setup.step_model):,} parameters) trained on {len(setup.data.train_rows):,} train × "
        f"{len(views)} views, {len(setup.data.valid_rows):,} valid images, device {device}")
    if cfg.augment.train:
        log(f"frozen features: augment.train is not used; the head sees the backbone's features of the "
            f"{len(views)} TTA view(s) of tta.views={cfg.tta.views} (each a training sample) and nothing else")


def run_head_epochs(cfg: Config, fold: int, run: FoldRun, setup: HeadSetup, progress: FoldProgress, log) -> bool:
    """The head's epochs on the cached features, validated on the identity view, saved after each; returns whether
    early stopping ended them."""
    valid_labels = setup.data.labels[setup.data.valid_rows]
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        epoch_seed = cfg.seed * 1_000_003 + fold * 10_007 + epoch
        setup.batches.set_seed(epoch_seed)
        torch.manual_seed(epoch_seed)                      # the MLP head's dropout
        reset_peak_memory(setup.device)
        started = time.perf_counter()
        train_loss, per_s = train_one_epoch(setup.step_model, setup.batches, setup.parts, setup.device, None,
                                            desc=f"fold {fold} head epoch {epoch}/{cfg.epochs}")
        head = evaluated_head(setup)
        valid_logits = head_logits(head, setup.valid_features[0], setup.device)
        row = {"epoch": epoch, "train_loss": train_loss,
               "val_loss": validation_loss(setup.parts.loss_fn, valid_logits, valid_labels, setup.device),
               "val_auc": float(roc_auc_score(valid_labels, valid_logits)), "lr": head_lr(setup.parts.optimizer),
               "images_per_s": per_s, "seconds": time.perf_counter() - started,
               "peak_memory_mb": peak_memory_mb(setup.device)}
        progress.history.append(row)
        improved = row["val_auc"] > progress.best_auc
        if improved:
            progress.best_auc, progress.best_epoch = row["val_auc"], epoch
            setup.best_head = copy.deepcopy(head.state_dict())
        run.write_history(progress.history, HISTORY_COLUMNS)
        progress.epoch = epoch
        save_head_resume(run, cfg, setup, progress)
        run.commit_staging()
        log(f"fold {fold} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}{'  (best)' if improved else ''}  {per_s:,.0f} features/s  "
            f"{row['seconds']:.1f}s")
        warning = stall_warning(cfg, fold, epoch, train_loss, setup.plateau_loss)
        if warning:
            log(warning)
        if cfg.train.early_stopping and epoch - progress.best_epoch >= cfg.train.early_stopping:
            log(f"fold {fold}: no better val AUC for {cfg.train.early_stopping} epochs; stopping early")
            return True
    return False


def finish_head_fold(cfg: Config, fold: int, run: FoldRun, setup: HeadSetup, progress: FoldProgress, log) -> dict:
    """The best head into the model's classifier slot → best.pt (a model that runs on images); its TTA-mean
    probabilities on the held-out rows → oof.csv; then metrics.json: the fold is finished."""
    data, head = setup.data, setup.model.net.get_classifier()
    head.load_state_dict(setup.best_head)
    save_best(run, cfg, fold, setup.model, progress.best_epoch, progress.best_auc)
    probabilities = tta_probabilities(head, setup.valid_features, setup.device)
    return write_fold_results(cfg, fold, run, data, progress, probabilities, setup.model, setup.device,
                              setup.plateau_loss, log, frozen_features=True, frozen_head=cfg.train.frozen_head,
                              head_parameters=count_parameters(setup.step_model),
                              feature_width=feature_width(setup.model), feature_key=setup.cache.key,
                              feature_seconds=setup.cache.seconds, features_computed=setup.cache.computed,
                              tta_combine="mean of the views' probabilities")
