"""One fold's training: the loop, mixed precision, the schedule, checkpoints, resume and out-of-fold predictions.

Per experiment and fold, `runs/<experiment>/fold<k>/` keeps:
  last.pt       everything needed to resume (weights, optimizer, schedule, RNG, history), after every epoch
  best.pt       weights of the epoch with the best validation AUC (what `predict` uses)
  history.csv   one row per epoch: losses, AUC, learning rate, images/s
  oof.csv       out-of-fold predictions of the best epoch: id, label, pred
  metrics.json  written when the fold is finished
  config.yaml   the effective config
Every file is written atomically, so an interrupted run leaves the previous complete version behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision.ops import sigmoid_focal_loss
from timm.utils import ModelEmaV3
from tqdm import tqdm

from .augment import NoBatchEquivalent, batch_equivalent, build_transform, choose_input
from .config import Config, LossConfig, save_config, to_dict
from .data import (AlbumentationsBatches, CachedBatches, augmented_model_input, cache_dir_for, check_data_dir,
                   gather_batch, load_split_images, read_train_labels, resident_images, to_model_input)
from .errors import KitError
from .folds import load_or_make_folds
from .io import atomic_torch_save, atomic_write_csv, atomic_write_json
from .models import build_model, count_parameters, head_parameter_names

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds"]


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

def experiment_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / cfg.name


def fold_dir(cfg: Config, fold: int) -> Path:
    return experiment_dir(cfg) / f"fold{fold}"


def select_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise KitError("config `device: cuda` but no GPU is visible to PyTorch; use device=auto or device=cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16; None = full precision."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Two parameter groups: the head at `lr`, the backbone at `lr × backbone_lr_scale`."""
    opt = cfg.optimizer
    head_names = head_parameter_names(model)
    groups = [
        {"name": "backbone", "lr": opt.lr * opt.backbone_lr_scale,
         "params": [p for n, p in model.named_parameters() if n not in head_names]},
        {"name": "head", "lr": opt.lr, "params": [p for n, p in model.named_parameters() if n in head_names]},
    ]
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                               nesterov=opt.momentum > 0)
    optimizer_class = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=opt.lr, weight_decay=opt.weight_decay)


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Per-step schedule: constant or cosine (each after a linear warm-up from lr/100), or one-cycle."""
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps, pct_start=cfg.schedule.pct_start)
    warmup_steps = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    floor = cfg.schedule.min_lr / cfg.optimizer.lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / warmup_steps
        if cfg.schedule.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(loss_cfg: LossConfig, device: torch.device):
    """Training loss on logits: BCE (with `pos_weight`) or focal, after optional label smoothing."""
    pos_weight = torch.tensor(loss_cfg.pos_weight, device=device)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if loss_cfg.label_smoothing:
            targets = targets * (1 - loss_cfg.label_smoothing) + 0.5 * loss_cfg.label_smoothing
        if loss_cfg.name == "focal":
            return sigmoid_focal_loss(logits, targets, alpha=loss_cfg.focal_alpha, gamma=loss_cfg.focal_gamma,
                                      reduction="mean")
        return nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)

    return loss_fn


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head (frozen parameters get no gradient, so no update)."""
    head_names = head_parameter_names(model)
    for name, parameter in model.named_parameters():
        if name not in head_names:
            parameter.requires_grad_(trainable)


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
# One epoch, and evaluation
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class TrainingParts:
    """What one optimisation step needs besides the model and the batch."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: object
    grad_clip: float = 0.0
    ema: object = None                 # timm ModelEmaV3, updated after every step


def train_one_epoch(model, batches, parts: TrainingParts, device, amp_dtype, desc: str | None,
                    check_every: int = 20):
    """One pass over `batches` ((inputs, labels) on the device); returns (mean loss, images per second).
    A progress bar shows loss and images/s (none when `desc` is None).

    The loss is summed on the device and read back every `check_every` steps (to check it and update the bar):
    reading it every step would make the CPU wait for the GPU instead of queueing the next batch.
    """
    model.train()
    loss_sum, seen, start = torch.zeros((), device=device), 0, time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True, leave=False, mininterval=0.5,
               disable=desc is None)
    for step, (inputs, labels) in enumerate(bar, 1):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = parts.loss_fn(model(inputs).float(), labels)
        loss_sum += loss.detach() * len(inputs)
        seen += len(inputs)
        if step % check_every == 0 or step == len(batches):
            mean_loss = loss_sum.item() / seen
            if not math.isfinite(mean_loss):
                raise KitError(f"training diverged ({desc}: loss is {mean_loss}); lower optimizer.lr")
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{seen / (time.perf_counter() - start):,.0f}")
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        if parts.grad_clip:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update(getattr(model, "_orig_mod", model))    # torch.compile wraps the module EMA tracks
    bar.close()
    return loss_sum.item() / max(1, seen), seen / max(1e-9, time.perf_counter() - start)


@torch.no_grad()
def predict_logits(model, images, indices: np.ndarray | None, batch_size: int, device, amp_dtype=None,
                   desc: str | None = None, transform=None, channels_last: bool = True) -> np.ndarray:
    """Logits for `images[indices]` (all when None), batch by batch from the uint8 cache, on the training fast path:
    the split is held in GPU memory when it fits (`resident_images`; pass a resident tensor to reuse one).

    `transform` (the config's `augment.valid`, usually empty) runs as a batch op when it has a batch equivalent
    (with a fixed seed), else per image through albumentations.
    """
    model.eval()
    images = resident_images(images, device)
    order = np.arange(len(images)) if indices is None else np.asarray(indices)
    augment, generator = None, torch.Generator().manual_seed(0)
    if transform is not None:
        try:
            augment, transform = batch_equivalent(transform, "augment.valid"), None
        except NoBatchEquivalent:
            pass
    outputs = []
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=desc is None, dynamic_ncols=True):
        batch = gather_batch(images, order[start:start + batch_size], device)
        if transform is not None:                                                 # per image, on the CPU
            batch = torch.from_numpy(np.stack([transform(image=image)["image"] for image in batch.cpu().numpy()]))
        if augment is None:
            inputs = to_model_input(batch, device, channels_last)
        else:                  # a D4 move regroups the batch: carry each image's position to put its logit back
            positions = torch.arange(len(batch), device=batch.device)
            inputs, positions = augmented_model_input(batch, positions, augment, generator, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs).float()
        if augment is not None:
            logits = torch.empty_like(logits).index_copy_(0, positions, logits)
        outputs.append(logits)                            # kept on the device: no wait for the GPU per batch
    return torch.cat(outputs).cpu().numpy() if outputs else np.empty(0, dtype=np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def bce_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Binary cross-entropy from logits, numerically stable."""
    logits = logits.astype(np.float64)
    return float(np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))))


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


def prepare_fold_data(cfg: Config, fold: int) -> FoldData:
    """Labels, folds and the image cache for one fold (cached images are shared by every fold)."""
    if fold < 0 or fold >= cfg.folds.n_splits:
        raise KitError(f"fold {fold} does not exist: folds.n_splits is {cfg.folds.n_splits} "
                       f"(folds 0..{cfg.folds.n_splits - 1})")
    data_dir = check_data_dir(cfg.data_dir)
    labels = read_train_labels(data_dir)
    folds = load_or_make_folds(labels, cfg.folds.n_splits, cfg.folds.seed, Path(cfg.out_dir) / "folds",
                               groups_csv=cfg.folds.groups_csv)
    images = load_split_images(data_dir, "train", labels["id"], cache_dir_for(cfg.out_dir, data_dir))
    fold_of_row = folds["fold"].to_numpy()
    train_rows = np.flatnonzero(fold_of_row != fold)
    if cfg.max_train_images:
        train_rows = train_rows[: cfg.max_train_images]
    return FoldData(ids=labels["id"].to_numpy(), labels=labels["label"].to_numpy(), images=images,
                    train_rows=train_rows, valid_rows=np.flatnonzero(fold_of_row == fold))


def fold_is_finished(cfg: Config, fold: int) -> bool:
    """Finished = metrics.json written, and all epochs run or stopped early."""
    metrics_path = fold_dir(cfg, fold) / "metrics.json"
    if not metrics_path.exists():
        return False
    metrics = json.loads(metrics_path.read_text())
    return metrics.get("stopped_early", False) or metrics.get("epochs_trained", 0) >= cfg.epochs


def train_fold(cfg: Config, fold: int, force: bool = False, on_epoch_end=None, log=print) -> dict:
    """Train (or resume) one fold; return its metrics. A finished fold is returned as is unless `force`.

    `on_epoch_end(epoch, row)` is called after each epoch's files are saved (tests use it to interrupt a run).
    """
    out = fold_dir(cfg, fold)
    if force and out.exists():
        shutil.rmtree(out)
    if fold_is_finished(cfg, fold):
        metrics = json.loads((out / "metrics.json").read_text())
        log(f"{cfg.name} fold {fold}: already trained (best val AUC {metrics['best_val_auc']:.4f} at epoch "
            f"{metrics['best_epoch']}); pass FORCE=1 to train it again")
        return metrics

    # ---- Setup: model, data, optimisation -------------------------------------------------------------------
    # the model first: a bad name or missing weights fails in seconds, before a long first cache build
    device = select_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed * 1000 + fold)
    channels_last = cfg.train.channels_last

    model = build_model(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.train.compile else model    # shares the weights; compiles on first use
    valid_transform = build_transform(cfg.augment.valid, "augment.valid")
    data = prepare_fold_data(cfg, fold)
    images = resident_images(data.images, device)        # the whole split in GPU memory when it fits
    batches, input_line = build_training_input(cfg, data, images, device)
    optimizer = build_optimizer(cfg, model)
    parts = TrainingParts(
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, len(batches)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),   # bf16 needs no scaling
        loss_fn=build_loss(cfg.loss, device),
        grad_clip=cfg.optimizer.grad_clip,
        ema=ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema_decay else None)

    # ---- Resume ----------------------------------------------------------------------------------------------
    history: list[dict] = []
    best_auc, best_epoch, start_epoch = -1.0, 0, 1
    last_path = out / "last.pt"
    if last_path.exists():
        state = load_checkpoint(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        parts.scheduler.load_state_dict(state["scheduler"])
        parts.scaler.load_state_dict(state["scaler"])
        if parts.ema is not None and state.get("ema") is not None:
            parts.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        history, best_auc, best_epoch = state["history"], state["best_auc"], state["best_epoch"]
        start_epoch = state["epoch"] + 1
        log(f"{cfg.name} fold {fold}: resuming after epoch {state['epoch']} (best val AUC {best_auc:.4f})")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    log(f"{cfg.name} fold {fold}/{cfg.folds.n_splits - 1}: model {cfg.model.name}, "
        f"{count_parameters(model):,} parameters, {len(data.train_rows):,} train / {len(data.valid_rows):,} valid "
        f"images, device {device}{f' ({amp_dtype})' if amp_dtype else ''}{', compiled' if cfg.train.compile else ''}")
    log(input_line)

    # ---- Epochs ----------------------------------------------------------------------------------------------
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_seed = cfg.seed * 1_000_003 + fold * 10_007 + epoch   # same batches and views whether resumed or not
        batches.set_seed(epoch_seed)
        set_backbone_trainable(model, epoch > cfg.train.freeze_backbone_epochs)
        started = time.perf_counter()
        train_loss, images_per_s = train_one_epoch(step_model, batches, parts, device, amp_dtype,
                                                   desc=f"fold {fold} epoch {epoch}/{cfg.epochs}")
        evaluated = parts.ema.module if parts.ema is not None else model     # EMA weights are the ones kept
        valid_logits = predict_logits(evaluated, images, data.valid_rows, cfg.eval_batch_size, device,
                                      amp_dtype, transform=valid_transform, channels_last=channels_last)
        valid_labels = data.labels[data.valid_rows]
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": bce_loss(valid_logits, valid_labels),
               "val_auc": float(roc_auc_score(valid_labels, valid_logits)),
               "lr": optimizer.param_groups[-1]["lr"], "images_per_s": images_per_s,
               "seconds": time.perf_counter() - started}
        history.append(row)
        improved = row["val_auc"] > best_auc
        if improved:
            best_auc, best_epoch = row["val_auc"], epoch
            atomic_torch_save(out / "best.pt", {"model": evaluated.state_dict(), "config": to_dict(cfg),
                                                "epoch": epoch, "val_auc": best_auc, "fold": fold})
            oof = pd.DataFrame({"id": data.ids[data.valid_rows], "label": valid_labels,
                                "pred": sigmoid(valid_logits)})
            atomic_write_csv(out / "oof.csv", oof)
        atomic_write_csv(out / "history.csv", pd.DataFrame(history, columns=HISTORY_COLUMNS))
        atomic_torch_save(last_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "torch_rng": torch.get_rng_state(), "epoch": epoch, "history": history, "best_auc": best_auc,
            "best_epoch": best_epoch, "config": to_dict(cfg)})
        log(f"fold {fold} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}{'  (best)' if improved else ''}  {images_per_s:,.0f} img/s  "
            f"{row['seconds']:.0f}s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if cfg.train.early_stopping and epoch - best_epoch >= cfg.train.early_stopping:
            stopped_early = True
            log(f"fold {fold}: no better val AUC for {cfg.train.early_stopping} epochs; stopping early")
            break

    # ---- Done ------------------------------------------------------------------------------------------------
    metrics = {"experiment": cfg.name, "fold": fold, "best_val_auc": best_auc, "best_epoch": best_epoch,
               "epochs_trained": len(history), "stopped_early": stopped_early,
               "train_images": int(len(data.train_rows)), "valid_images": int(len(data.valid_rows)),
               "model": cfg.model.name, "parameters": count_parameters(model), "device": str(device)}
    atomic_write_json(out / "metrics.json", metrics)
    log(f"{cfg.name} fold {fold}: done, best val AUC {best_auc:.4f} at epoch {best_epoch} → {out}")
    return metrics


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged or foreign file: name it rather than show torch's internals
        raise KitError(f"cannot read checkpoint {path} ({type(err).__name__}); delete it or retrain with FORCE=1") \
            from None
