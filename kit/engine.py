"""One fold's training: the loop, mixed precision, the schedule, EMA, resume, and out-of-fold predictions.

What a fold leaves on disk, and every rule about it (finished, config-checked resume, FORCE, the lock), belongs to
`kit/runs.py`; this module asks it.
"""

from __future__ import annotations

import copy
import math
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
from torchvision.ops import sigmoid_focal_loss
from timm.utils import ModelEmaV3
from torch.optim.swa_utils import AveragedModel, update_bn

from . import distributed
from .augment import NoBatchEquivalent, batch_equivalent, build_transform, choose_input
from .config import Config, LossConfig, to_dict
from .data import (AlbumentationsBatches, CachedBatches, augmented_model_input, cache_dir_for, check_data_dir,
                   check_test_images, gather_batch, load_split_images, read_train_labels, resident_images,
                   to_model_input)
from .device import (autocast_dtype, card_name, intended_sync, peak_memory_mb, precision_name, reset_peak_memory,
                     select_device, sync_debug)
from .errors import Interrupted, KitError
from .folds import Split, load_split
from .io import require_writable_dir
from .models import build_model, count_parameters, head_parameter_names, start_head_neutral
from .progress import progress_bar
from .runs import BEST, LAST, FoldRun, check_split_against_data, fold_lock
from .tta import tta_view_count, with_tta

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds", "peak_memory_mb"]


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_groups(cfg: Config, model: nn.Module) -> list[dict]:
    """Backbone and head (the head at `lr`, the backbone at `lr × backbone_lr_scale`), each split into weights
    that decay and norm weights, biases and timm's `no_weight_decay()` names that do not (as timm, nanoGPT and
    ConvNeXt do: decaying a norm's scale or a bias only fights the normalisation)."""
    opt = cfg.optimizer
    head_names = head_parameter_names(model)
    net = getattr(model, "net", model)
    exempt = {f"net.{name}" for name in (net.no_weight_decay() if hasattr(net, "no_weight_decay") else ())}
    groups = {}
    for name, parameter in model.named_parameters():
        part = "head" if name in head_names else "backbone"
        decays = parameter.ndim > 1 and name not in exempt and not any(name.startswith(e + ".") for e in exempt)
        key = part if decays else f"{part}_no_decay"
        groups.setdefault(key, {"name": key, "lr": opt.lr * (1.0 if part == "head" else opt.backbone_lr_scale),
                                "weight_decay": opt.weight_decay if decays else 0.0, "params": []})
        groups[key]["params"].append(parameter)
    order = ("backbone", "backbone_no_decay", "head", "head_no_decay")
    return [groups[key] for key in order if key in groups]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over `parameter_groups`; on a GPU the fused kernels (one launch for every tensor, and
    with fp16 the GradScaler's inf check stays on the device instead of a sync per step)."""
    opt, groups = cfg.optimizer, parameter_groups(cfg, model)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.momentum > 0, **fused)
    optimizer_class = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=opt.lr, **fused)


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    return next(g["lr"] for g in optimizer.param_groups if g["name"].startswith("head"))


MAX_WARMUP_SHARE = 0.2    # a warm-up never takes more than this share of the run, so a short run trains at full rate


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    return min(round(cfg.schedule.warmup_epochs * steps_per_epoch), int(MAX_WARMUP_SHARE * total_steps))


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Per-step schedule: constant or cosine (each after a linear warm-up from lr/100, at most 20% of the run), or
    one-cycle."""
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps, pct_start=cfg.schedule.pct_start)
    warmup = warmup_steps(cfg, steps_per_epoch)
    floor = cfg.schedule.min_lr / cfg.optimizer.lr

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        if cfg.schedule.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StepEma(ModelEmaV3):
    """timm's ModelEmaV3, warmed up by the optimizer step (decay 1 - (1 + step)^-2/3, capped at `decay`), so the
    average forgets the initial weights (random head included) within the first few hundred steps; and with its
    tensor lists gathered once, not walked out of `state_dict()` at every step. The lists alias the live tensors:
    optimizer steps and `load_state_dict` update them in place."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, decay=decay, use_warmup=True)
        self._pairs = None

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        if self._pairs is None or self._pairs[0] is not model:
            pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
            floating = [(ema, live) for ema, live in pairs if ema.is_floating_point()]
            self._pairs = (model, [ema for ema, _ in floating], [live for _, live in floating],
                           [(ema, live) for ema, live in pairs if not ema.is_floating_point()])
        _, ema_values, live_values, counters = self._pairs
        torch._foreach_lerp_(ema_values, live_values, weight=1.0 - decay)    # same dtypes: the EMA is a copy
        if counters:                     # BatchNorm's num_batches_tracked: copied, one kernel for all
            torch._foreach_copy_([ema for ema, _ in counters], [live for _, live in counters])


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


def constant_prediction_loss(loss_cfg: LossConfig, labels: np.ndarray) -> float:
    """The training loss of the best constant prediction (the prior for every patch): where a model that has
    learned nothing sits. ln 2 for BCE on balanced labels; any loss option (pos_weight, focal, smoothing) included."""
    loss_fn = build_loss(loss_cfg, torch.device("cpu"))
    targets = torch.as_tensor(labels, dtype=torch.float32)
    with torch.no_grad():
        return min(float(loss_fn(torch.full_like(targets, float(logit)), targets))
                   for logit in torch.linspace(-8, 8, 321))


STALL_TOLERANCE = 0.01     # a train loss within 1% of the constant-prediction loss: the model has not started


def is_stalled(train_loss: float, plateau: float) -> bool:
    """Not clearly below the prior's loss: the model has not started learning."""
    return train_loss >= plateau * (1 - STALL_TOLERANCE)


def stall_warning(cfg: Config, fold: int, epoch: int, train_loss: float, plateau: float) -> str | None:
    if not is_stalled(train_loss, plateau):
        return None
    advice = ("model.name=baseline_bn (the same CNN with normalisation layers, which leaves the plateau on every "
              "seed), or optimizer.lr=3e-4" if cfg.model.name == "baseline" else
              "a lower optimizer.lr, a warm-up (schedule.warmup_epochs), or check model.pretrained_file")
    return (f"warning: fold {fold} epoch {epoch}: train loss {train_loss:.4f} is within {STALL_TOLERANCE:.0%} of "
            f"{plateau:.4f}, the loss of predicting the prior for every patch: the model has not started learning; "
            f"try {advice}")


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head (frozen parameters get no gradient, so no update)."""
    head_names = head_parameter_names(model)
    for name, parameter in model.named_parameters():
        if name not in head_names:
            parameter.requires_grad_(trainable)


def hold_backbone(optimizer: torch.optim.Optimizer, scheduler, held: bool) -> None:
    """Freeze by a zero learning rate (what `train.compile` uses): the graph stays the same, so the compiled model
    is not recompiled at the unfreeze, as it would be when `requires_grad` changes. Released, each group gets the
    rate its schedule gives now (schedulers compute it from the step, never from the current value)."""
    for group, scheduled in zip(optimizer.param_groups, scheduler.get_last_lr()):
        if group["name"].startswith("backbone"):
            group["lr"] = 0.0 if held else scheduled


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
    ema: StepEma | None = None         # updated after every step, its warm-up driven by the step count


def train_one_epoch(model, batches, parts: TrainingParts, device, amp_dtype, desc: str | None,
                    check_every: int = 20, hold_backbone_lr: bool = False):
    """One pass over `batches` ((inputs, labels) on the device); returns (mean loss, images per second).
    A progress bar shows loss and images/s (none when `desc` is None).

    The loss is summed on the device and read back every `check_every` steps (to check it and update the bar):
    reading it every step would make the CPU wait for the GPU instead of queueing the next batch. Nothing else in
    the loop waits for the GPU (tests/test_gpu_path.py checks every copy).
    `hold_backbone_lr`: the backbone is frozen by a zero learning rate (`hold_backbone`).
    """
    model.train()
    world = distributed.current().world       # under DDP every rank trains an equal share of each batch
    loss_sum, seen, start = torch.zeros((), device=device), 0, time.perf_counter()
    bar = progress_bar(batches, desc=desc, unit="batch", leave=False, hidden=desc is None)
    with sync_debug(device):
        for step, (inputs, labels) in enumerate(bar, 1):
            seen += len(inputs) * world
            train_step(model, inputs, labels, parts, device, amp_dtype, loss_sum, hold_backbone_lr)
            if step % check_every == 0 or step == len(batches):
                with intended_sync():             # summed over the ranks: every rank sees the same loss, and stops
                    mean_loss = distributed.sum_across_ranks(loss_sum).item() / seen      # together if it diverges
                if not math.isfinite(mean_loss):
                    raise KitError(f"training diverged ({desc or 'an epoch'}: loss is {mean_loss}); lower "
                                   f"optimizer.lr")
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{seen / (time.perf_counter() - start):,.0f}")
    bar.close()
    return (distributed.sum_across_ranks(loss_sum).item() / max(1, seen),
            seen / max(1e-9, time.perf_counter() - start))


def train_step(model, inputs, labels, parts: TrainingParts, device, amp_dtype, loss_sum: torch.Tensor,
               hold_backbone_lr: bool) -> None:
    """Forward, backward, update, schedule and EMA for one batch; its loss × batch size is added to `loss_sum` on
    the device (never read here)."""
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = parts.loss_fn(model(inputs).float(), labels)
    loss_sum += loss.detach() * len(inputs)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if parts.grad_clip:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    if hold_backbone_lr:
        hold_backbone(parts.optimizer, parts.scheduler, held=True)
    if parts.ema is not None:        # the scheduler counts optimizer steps, across resumes too
        parts.ema.update(unwrap(model), step=parts.scheduler.last_epoch)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of torch.compile's and DDP's wrappers (what EMA, SWA and checkpoints hold)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


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
    for start in progress_bar(starts, desc=desc, unit="batch", leave=False, hidden=desc is None):
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


def predict_probabilities(model, images, views: str, batch_size: int, device, amp_dtype=None, desc: str | None = None,
                          rows: np.ndarray | None = None, transform=None, channels_last: bool = True) -> np.ndarray:
    """Mean probability over the TTA views (`tta.views`) for `images[rows]` (all when None): what the submission
    averages, and what a fold's oof.csv holds."""
    # predict_logits is the batched inference; here the "logit" is already the TTA-mean probability
    return predict_logits(with_tta(model, views), images, rows, batch_size, device, amp_dtype, desc=desc,
                          transform=transform, channels_last=channels_last)


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
    optimizer = build_optimizer(cfg, model)
    parts = TrainingParts(
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, len(batches)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),   # bf16 needs no scaling
        loss_fn=build_loss(cfg.loss, device),
        grad_clip=cfg.optimizer.grad_clip,
        ema=StepEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None)
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
    trained_by = int(state.get("world_size", 1))
    if trained_by != world:
        raise KitError(f"{run.label} was being trained by {trained_by} process(es) (NPROC={trained_by}), not "
                       f"{world}: each process's share of a batch and its augmentations depend on the count; resume "
                       f"with NPROC={trained_by}, or retrain it with FORCE=1")
    return FoldPlan(state=state, extension=decision.extension)


def train_fold(cfg: Config, fold: int, force: bool = False, on_epoch_end=None, log=print) -> dict:
    """Train (or resume) one fold; return its metrics.

    A finished fold is returned as is, and a fold trained with another config is refused (naming the keys),
    unless `force`: then everything is checked first, and the old fold is replaced only once the new run has
    written its first checkpoint. `on_epoch_end(epoch, row)` runs after each epoch's files are saved (tests use
    it to interrupt a run).

    Under torchrun (`make train NPROC=N`) every rank runs this: rank 0 takes the lock, decides, logs and writes;
    the others follow its decision and train their share (kit/distributed.py).
    """
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

        if ranks.active:      # rank 0 builds what all share (with its progress bar) while the others wait
            distributed.from_main(lambda: prepare_shared(cfg, log))
        setup = distributed.together(lambda: set_up_fold(cfg, fold))
        wrap_step_model(cfg, setup)
        progress = {"history": [], "best_auc": -1.0, "best_epoch": 0, "epoch": 0}
        if plan.state is not None:
            progress = restore(plan.state, setup)
            log(f"{cfg.name} fold {fold}: resuming after epoch {progress['epoch']} (best val AUC "
                f"{progress['best_auc']:.4f})" + (f"; epochs raised {plan.extension[0]} → {plan.extension[1]}"
                                                   if plan.extension else ""))
        else:
            run.start_fresh(keep_existing=plan.keep_existing)
        try:
            run.write_identity(setup.data.split.record, plan.extension if plan.state is not None else None)
            describe_setup(cfg, fold, setup, log)
            stopped_early = progress["stopped"] = run_epochs(cfg, fold, run, setup, progress, on_epoch_end, log)
            metrics = finish_fold(cfg, fold, run, setup, progress, stopped_early, log)
            # every rank leaves once rank 0 has written the fold's files (train-all reads them next)
            return distributed.from_main(lambda: metrics)
        except KeyboardInterrupt as err:
            staged = run.directory == run.staging_dir
            run.discard_staging()     # a FORCE=1 retrain stopped before its first checkpoint: the old fold stands
            raise err if isinstance(err, Interrupted) else interrupted_fold(cfg, fold, run, progress, staged) from None
        except BaseException:
            run.discard_staging()
            raise


def interrupted_fold(cfg: Config, fold: int, run: FoldRun, progress: dict, staged: bool) -> Interrupted:
    """Ctrl-C during a fold: what its run folder now holds, and what rerunning the command does."""
    saved = progress["epoch"]
    if saved == 0:
        kept = " (the fold trained before stays as it was)" if staged else ""
        return Interrupted(f"interrupted in the first epoch of fold {fold}: nothing of this run was saved{kept}; "
                           f"rerun the same command to start it")
    if saved >= cfg.epochs or progress.get("stopped"):
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
    planned = round(cfg.schedule.warmup_epochs * len(setup.batches))
    if cfg.schedule.name != "onecycle" and planned > warmup_steps(cfg, len(setup.batches)):
        log(f"schedule: warm-up shortened from {cfg.schedule.warmup_epochs:g} epochs to "
            f"{warmup_steps(cfg, len(setup.batches))} steps ({MAX_WARMUP_SHARE:.0%} of the run)")


def restore(state: dict, setup: FoldSetup) -> dict:
    """Load last.pt into the model, optimizer, schedule, scaler, EMA and RNG; return the run's progress."""
    parts = setup.parts
    setup.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and parts.scaler.is_enabled():    # a CPU or bf16 run saved `{}`: nothing to load
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.load_state_dict(state["ema"])
    if setup.swa is not None and state.get("swa") is not None:
        setup.swa.load_state_dict(state["swa"])
    torch.set_rng_state(state["torch_rng"])
    return {"history": state["history"], "best_auc": state["best_auc"], "best_epoch": state["best_epoch"],
            "epoch": state["epoch"]}


def predict_held_out(cfg: Config, setup: FoldSetup, model: nn.Module, views: str | None = None) -> np.ndarray:
    """The fold's held-out rows through `model`: logits, or with `views` the TTA-mean probability (what oof.csv
    holds). Under DDP each rank predicts its shard and every rank gets all the rows back, in order."""
    rows = distributed.shard(setup.data.valid_rows)
    options = dict(transform=setup.valid_transform, channels_last=cfg.train.channels_last)
    if views is None:
        local = predict_logits(model, setup.images, rows, cfg.eval_batch_size, setup.device, setup.amp_dtype,
                               **options)
    else:
        local = predict_probabilities(model, setup.images, views, cfg.eval_batch_size, setup.device,
                                      setup.amp_dtype, rows=rows, **options)
    return distributed.gather_rows(local)


def run_epochs(cfg: Config, fold: int, run: FoldRun, setup: FoldSetup, progress: dict, on_epoch_end, log) -> bool:
    """Train and validate epoch by epoch, saving after each; return whether early stopping ended the run."""
    model, parts, data = setup.model, setup.parts, setup.data
    ranks = distributed.current()
    # a fixed graph (compile) or DDP's gradient hooks must not see requires_grad change: freeze by a zero rate
    freeze_by_lr = cfg.train.compile or ranks.active
    valid_labels = data.labels[data.valid_rows]
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
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
        train_loss, images_per_s = train_one_epoch(setup.step_model, setup.batches, parts, setup.device,
                                                   setup.amp_dtype, hold_backbone_lr=frozen and freeze_by_lr,
                                                   desc=f"fold {fold} epoch {epoch}/{cfg.epochs}" if ranks.is_main
                                                   else None)
        if ranks.active:      # each rank's BatchNorm statistics followed its own share: rank 0's become everyone's
            distributed.copy_from_main(list(model.buffers()) +
                                       (list(parts.ema.module.buffers()) if parts.ema is not None else []))
        if setup.swa is not None and epoch > cfg.epochs - cfg.train.swa_epochs:
            setup.swa.update_parameters(model)
        evaluated = parts.ema.module if parts.ema is not None else model     # EMA weights are the ones kept
        valid_logits = predict_held_out(cfg, setup, evaluated)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": bce_loss(valid_logits, valid_labels),
               "val_auc": float(roc_auc_score(valid_labels, valid_logits)), "lr": head_lr(parts.optimizer),
               "images_per_s": images_per_s, "seconds": time.perf_counter() - started,
               "peak_memory_mb": peak_memory_mb(setup.device)}
        progress["history"].append(row)
        improved = row["val_auc"] > progress["best_auc"]
        if improved:
            progress["best_auc"], progress["best_epoch"] = row["val_auc"], epoch
            run.save_checkpoint(BEST, {"model": evaluated.state_dict(), "config": to_dict(cfg), "epoch": epoch,
                                       "val_auc": row["val_auc"], "fold": fold})
        run.write_history(progress["history"], HISTORY_COLUMNS)
        progress["epoch"] = epoch
        run.save_checkpoint(LAST, {
            "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "swa": setup.swa.state_dict() if setup.swa is not None else None,
            "torch_rng": torch.get_rng_state(), "amp_dtype": precision_name(setup.amp_dtype),
            "world_size": ranks.world,
            "epoch": epoch, "history": progress["history"],
            "best_auc": progress["best_auc"], "best_epoch": progress["best_epoch"], "config": to_dict(cfg)})
        run.commit_staging()           # FORCE=1: the new run has a checkpoint now, so it replaces the old fold
        log(f"fold {fold} epoch {epoch}/{cfg.epochs}: train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}{'  (best)' if improved else ''}  {images_per_s:,.0f} img/s  "
            f"{row['seconds']:.0f}s" + (f"  peak {row['peak_memory_mb']:,.0f} MB" if row["peak_memory_mb"] else ""))
        warning = stall_warning(cfg, fold, epoch, train_loss, setup.plateau_loss)
        if warning:
            log(warning)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if cfg.train.early_stopping and epoch - progress["best_epoch"] >= cfg.train.early_stopping:
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
    run.save_checkpoint(BEST, {"model": averaged.state_dict(), "config": to_dict(cfg), "epoch": cfg.epochs,
                               "val_auc": auc, "fold": fold, "swa_epochs": int(setup.swa.n_averaged)})
    log(f"fold {fold}: SWA over {int(setup.swa.n_averaged)} epochs: val AUC {auc:.4f} (kept as best.pt)")
    return {"swa_val_auc": auc, **bn_pass}


def finish_fold(cfg: Config, fold: int, run: FoldRun, setup: FoldSetup, progress: dict, stopped_early: bool,
                log) -> dict:
    """Predict the held-out rows with best.pt and the configured TTA views (as the submission will), write
    oof.csv, then metrics.json: the fold is finished."""
    data = setup.data
    swa = finish_swa(cfg, fold, run, setup, log) if setup.swa is not None else {}
    best_model = copy.deepcopy(setup.parts.ema.module if setup.parts.ema is not None else setup.model)
    best_model.load_state_dict(distributed.from_main(lambda: run.load_checkpoint(BEST)["model"]))
    reset_peak_memory(setup.device)             # the TTA pass (views stacked into one forward) has its own peak
    probabilities = predict_held_out(cfg, setup, best_model, views=cfg.tta.views)
    tta_peak = peak_memory_mb(setup.device)
    valid_labels = data.labels[data.valid_rows]
    oof_auc = float(roc_auc_score(valid_labels, probabilities))
    run.write_oof(pd.DataFrame({"id": data.ids[data.valid_rows], "label": valid_labels, "pred": probabilities}))
    metrics = {"experiment": cfg.name, "fold": fold, "best_val_auc": progress["best_auc"],
               "best_epoch": progress["best_epoch"], "oof_auc": oof_auc, "tta": cfg.tta.views,
               "tta_views": tta_view_count(cfg.tta.views), "epochs_trained": len(progress["history"]),
               "stopped_early": stopped_early, "train_images": int(len(data.train_rows)),
               "valid_images": int(len(data.valid_rows)), "model": cfg.model.name,
               "parameters": count_parameters(setup.model), "device": str(setup.device),
               "processes": distributed.current().world,
               "ema": bool(cfg.train.ema_decay), "swa_val_auc": swa.get("swa_val_auc"),
               "swa_bn_seconds": swa.get("swa_bn_seconds"), "swa_bn_peak_memory_mb": swa.get("swa_bn_peak_memory_mb"),
               "tta_peak_memory_mb": tta_peak, "plateau_loss": setup.plateau_loss,
               "stalled": is_stalled(progress["history"][-1]["train_loss"], setup.plateau_loss)}
    run.write_metrics(metrics)
    log(f"{cfg.name} fold {fold}: done, best val AUC {progress['best_auc']:.4f} at epoch {progress['best_epoch']}; "
        f"OOF AUC with {tta_view_count(cfg.tta.views)} TTA views {oof_auc:.4f} → {run.directory}")
    return metrics
