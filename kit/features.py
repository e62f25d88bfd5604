"""Frozen features (`train.frozen_features: true`): the head trained on a frozen backbone's cached features
(kit/feature_cache.py), one of the fold lifecycle's two training methods.

The fold contract is fine-tuning's (kit/runs.py's rules, kit/checkpoints.py's best.pt): best.pt holds the backbone
with the trained head in its classifier slot, so `make predict` and the Kaggle notebook run it on images, with the
TTA views averaged as probabilities, which is what oof.csv holds too. last.pt holds only the head's state and the
key of the features it was trained on (a changed backbone is never resumed into).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from . import distributed
from .array_cache import fits_resident
from .batches import batches_per_epoch
from .checkpoints import save_best
from .config import Config
from .device import autocast_dtype, card_name, precision_name, reset_peak_memory, select_device
from .errors import KitError, SharedError
from .feature_cache import cached_features, feature_width
from .fold_data import TrainingSet, fold_data
from .models import (
    BASELINES,
    build_model,
    count_parameters,
    set_frozen_head,
    start_head_neutral,
)
from .progress import say
from .recipe import (
    build_training_parts,
    constant_prediction_loss,
    seed_everything,
    set_backbone_trainable,
    step_ema,
    train_one_epoch,
)
from .runs import FoldRun

METHOD = "frozen-features"     # last.pt's `method` (kit/checkpoints.py)

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


class HeadOnFrozenFeatures:
    """The model with the `train.frozen_head` head, the fold's rows, the features (computed on first need) and the
    head's recipe; built before the run folder is touched."""

    kind = METHOD
    speed_unit = "features/s"
    # a head on fixed features is a convex (linear) or shallow problem: it stalls from too little rate, not too much
    stall_advice = "a higher optimizer.lr (a head on frozen features takes 1e-3 to 1e-2), or check model.pretrained_file"

    def __init__(self, cfg: Config, fold: int, training: TrainingSet, log=say):
        check_frozen_config(cfg)
        self.cfg, self.fold = cfg, fold
        self.device = device = select_device(cfg.device)
        self.amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype)
        seed_everything(cfg.seed * 1000 + fold)
        model = set_frozen_head(build_model(cfg.model), cfg.train.frozen_head).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.eval()
        set_backbone_trainable(model, False)
        self.model = model           # the backbone with the head in its classifier slot (best.pt's model)
        self.data = data = fold_data(cfg, fold, training)
        start_head_neutral(model, float(data.train_labels.mean()))
        self.cache = cached_features(cfg, model, data.images, device, self.amp_dtype, log)
        train_features = torch.from_numpy(np.stack([np.asarray(a[data.train_rows]) for a in self.cache.arrays]))
        self.batches = FeatureBatches(train_features, data.train_labels, cfg.batch_size, device)
        self.valid_features = [np.asarray(a[data.valid_rows]) for a in self.cache.arrays]   # per view
        self.step_model = HeadOnFeatures(model.net.get_classifier())    # that head, fed features
        # the head trains in fp32 (it is tiny); its EMA averages the head alone, not a copy of the whole model
        no_ema = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=0.0))
        self.parts = build_training_parts(no_ema, model, len(self.batches), None)
        self.parts.ema = step_ema(self.step_model, cfg.train.ema_decay)
        self.plateau_loss = constant_prediction_loss(cfg.loss, data.train_labels)
        # the best epoch's head weights (written into best.pt once the epochs are done)
        self.best_head = copy.deepcopy(self.step_model.head.state_dict())

    # ---- what the lifecycle asks ----------------------------------------------------------------------------

    def describe(self, log) -> None:
        cfg, data, views = self.cfg, self.data, self.cache.views
        device = card_name(self.device) if self.device.type == "cuda" else "cpu"
        log(f"{cfg.name} fold {self.fold} (of 0–{cfg.folds.n_splits - 1}): frozen features of {cfg.model.name} "
            f"({count_parameters(self.model):,} parameters, {precision_name(self.amp_dtype)}): "
            f"{feature_width(self.model):,} features × {len(views)} view(s); {cfg.train.frozen_head} head "
            f"({count_parameters(self.step_model):,} parameters) trained on {len(data.train_rows):,} train × "
            f"{len(views)} views, {len(data.valid_rows):,} valid images, device {device}")
        if cfg.augment.train:
            log(f"frozen features: augment.train is not used; the head sees the backbone's features of the "
                f"{len(views)} TTA view(s) of tta.views={cfg.tta.views} (each a training sample) and nothing else")

    @property
    def evaluated_head(self) -> nn.Module:
        return self.parts.ema.module.head if self.parts.ema is not None else self.step_model.head

    def start_epoch(self, epoch: int, epoch_seed: int) -> None:
        self.batches.set_seed(epoch_seed)
        torch.manual_seed(epoch_seed)                      # the MLP head's dropout
        reset_peak_memory(self.device)

    def train_epoch(self, epoch: int, desc: str | None, on_check) -> tuple[float, float]:
        return train_one_epoch(self.step_model, self.batches, self.parts, self.device, None, desc=desc,
                               on_check=on_check)

    def validation_logits(self) -> np.ndarray:
        """The identity view's features through the head."""
        return head_logits(self.evaluated_head, self.valid_features[0], self.device)

    def keep_best(self, run: FoldRun, epoch: int, val_auc: float) -> None:
        self.best_head = copy.deepcopy(self.evaluated_head.state_dict())

    def resume_state(self) -> dict:
        """The head's state only (the backbone is in the config), and the key of the features it trained on."""
        parts = self.parts
        return {"head": self.step_model.head.state_dict(), "best_head": self.best_head,
                "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
                "ema": parts.ema.state_dict() if parts.ema is not None else None, "feature_key": self.cache.key}

    def load_resume_state(self, state: dict) -> None:
        """Refused when the features changed since (another weights file at the same path, other mean/std, views
        or precision): the head was trained on features this backbone no longer computes."""
        if state.get("feature_key") != self.cache.key:
            was = state.get("feature_key") or "not recorded (a kit before the key was saved)"
            raise KitError(f"fold {self.fold} of `{self.cfg.name}`: its head was trained on other features (feature "
                           f"key {was}, now {self.cache.key}: the backbone's weights, mean/std, views or precision "
                           f"changed), so it cannot be resumed; retrain it with FORCE=1")
        self.step_model.head.load_state_dict(state["head"])
        self.parts.optimizer.load_state_dict(state["optimizer"])
        self.parts.scheduler.load_state_dict(state["scheduler"])
        if self.parts.ema is not None and state.get("ema") is not None:
            self.parts.ema.load_state_dict(state["ema"])
        self.best_head = state["best_head"]

    def finish(self, run: FoldRun, progress, log) -> tuple[np.ndarray, dict]:
        """The best head into the model's classifier slot → best.pt (a model that runs on images); its TTA-mean
        probabilities on the held-out rows: oof.csv's."""
        head = self.model.net.get_classifier()
        head.load_state_dict(self.best_head)
        save_best(run, self.cfg, self.fold, self.model, progress.best_epoch, progress.best_auc)
        probabilities = tta_probabilities(head, self.valid_features, self.device)
        return probabilities, {"frozen_features": True, "frozen_head": self.cfg.train.frozen_head,
                               "head_parameters": count_parameters(self.step_model),
                               "feature_width": feature_width(self.model), "feature_key": self.cache.key,
                               "feature_seconds": self.cache.seconds, "features_computed": self.cache.computed,
                               "tta_combine": "mean of the views' probabilities"}

    def clock_work(self) -> dict:
        views = len(self.cache.views)
        return {"train_images": len(self.data.train_rows) * views, "valid_images": len(self.data.valid_rows),
                "tta_views": views, "swa": False}
