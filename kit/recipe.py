"""The training recipe: what turns a model and a config into optimisation steps, and one pass over the batches.

Parameter groups (backbone/head, decay/no decay), the optimizer, the per-step schedule with its warm-up, the loss,
the EMA of the weights, freezing the backbone (by `requires_grad`, or by a zero learning rate under compile or DDP),
and the stall check against the loss of predicting the prior. `build_training_parts` assembles them, and
`train_one_epoch` runs them over ready batches, for a fold (kit/engine.py) and for `make bench` alike. Each option's
names are declared by the config schema (config.OPTIMIZERS, SCHEDULES, LOSSES); this module keys its implementations
by the same names (OPTIMIZER_CLASSES, SCHEDULE_FACTORS, LOSS_FUNCTIONS).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .config import Config, LossConfig
from .device import intended_sync, sync_debug
from .errors import KitError
from .models import head_parameter_names
from .progress import progress_bar

if TYPE_CHECKING:
    from .ema import StepEma


def parameter_groups(cfg: Config, model: nn.Module) -> list[dict]:
    """Backbone and head (the head at `lr`, the backbone at `lr × backbone_lr_scale`), each split into weights
    that decay and norm weights, biases and timm's `no_weight_decay()` names that do not (as timm, nanoGPT and
    ConvNeXt do: decaying a norm's scale or a bias only fights the normalisation).

    With `optimizer.layer_decay` the backbone is split by depth too (`layer_decay_scales`): each layer's rate is the
    backbone's × layer_decay^(layers above it), the head's stays `lr`. Parameters frozen for good
    (`model.trainable_blocks`) are in no group, so the optimizer keeps no state for them."""
    opt = cfg.optimizer
    head_names = head_parameter_names(model)
    net = getattr(model, "net", model)
    exempt = {f"net.{name}" for name in (net.no_weight_decay() if hasattr(net, "no_weight_decay") else ())}
    frozen = getattr(model, "frozen_parameter_names", set())
    depth = layer_decay_scales(cfg, model)
    groups, order = {}, {}
    for name, parameter in model.named_parameters():
        if name in frozen:
            continue
        part = "head" if name in head_names else "backbone"
        decays = parameter.ndim > 1 and name not in exempt and not any(name.startswith(e + ".") for e in exempt)
        layer, scale = depth[name] if part == "backbone" and name in depth else (None, 1.0)
        base = part if layer is None else f"backbone_layer{layer}"
        key = base if decays else f"{base}_no_decay"
        groups.setdefault(key, {"name": key, "lr": opt.lr * (1.0 if part == "head" else opt.backbone_lr_scale * scale),
                                "weight_decay": opt.weight_decay if decays else 0.0, "params": []})
        groups[key]["params"].append(parameter)
        order[key] = (part == "head", -1 if layer is None else layer, not decays)   # input to output, decay first
    return [groups[key] for key in sorted(groups, key=order.get)]


def layer_decay_scales(cfg: Config, model: nn.Module) -> dict[str, tuple[int, float]]:
    """Backbone parameter name → (layer, lr factor layer_decay^(top - layer)), from timm's layer map: the model's
    `group_matcher(coarse=False)` (stem 0, each block, head last), the map `timm.optim.param_groups_layer_decay`
    builds. Its groups carry the factor as `lr_scale`, which only timm's schedulers read; the kit's schedules scale
    each group's `lr`, so the factor goes there, composed with `backbone_lr_scale`. {} when layer decay is off."""
    decay = cfg.optimizer.layer_decay
    if not decay:
        return {}
    net = getattr(model, "net", model)
    if not hasattr(net, "group_matcher"):
        raise KitError(f"config `optimizer.layer_decay: {decay}`: `{cfg.model.name}` has no layer map (timm models "
                       f"have one: group_matcher); set optimizer.layer_decay=0 for it")
    from timm.models import group_parameters

    layers = group_parameters(net, net.group_matcher(coarse=False), reverse=True)
    top = max(layers.values())
    return {f"net.{name}": (layer, decay ** (top - layer)) for name, layer in layers.items()}


# optimizer.name → (the torch class, its keyword arguments from the config)
OPTIMIZER_CLASSES = {
    "adam": (torch.optim.Adam, lambda opt: {}),
    "adamw": (torch.optim.AdamW, lambda opt: {}),
    "sgd": (torch.optim.SGD, lambda opt: {"momentum": opt.momentum, "nesterov": opt.momentum > 0}),
}


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over `parameter_groups`; on a GPU the fused kernels (one launch for every tensor, and
    with fp16 the GradScaler's inf check stays on the device instead of a sync per step)."""
    opt, groups = cfg.optimizer, parameter_groups(cfg, model)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    optimizer_class, options = OPTIMIZER_CLASSES[opt.name]
    return optimizer_class(groups, lr=opt.lr, **options(opt), **fused)


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    return next(g["lr"] for g in optimizer.param_groups if g["name"].startswith("head"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


MAX_WARMUP_SHARE = 0.2    # a warm-up never takes more than this share of the run, so a short run trains at full rate


def warmup_steps(cfg: Config, steps_per_epoch: int) -> int:
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    return min(round(cfg.schedule.warmup_epochs * steps_per_epoch), int(MAX_WARMUP_SHARE * total_steps))


def constant_after_warmup(cfg: Config, progress: float) -> float:
    return 1.0


def cosine_after_warmup(cfg: Config, progress: float) -> float:
    floor = cfg.schedule.min_lr / cfg.optimizer.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# schedule.name → the lr factor after the warm-up at `progress` (0 → 1 over the remaining steps); None: one-cycle,
# torch's OneCycleLR, with its own rise
SCHEDULE_FACTORS = {"constant": constant_after_warmup, "cosine": cosine_after_warmup, "onecycle": None}


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Per-step schedule: constant or cosine (each after a linear warm-up from lr/100, at most 20% of the run), or
    one-cycle."""
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    after_warmup = SCHEDULE_FACTORS[cfg.schedule.name]
    if after_warmup is None:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total_steps, pct_start=cfg.schedule.pct_start)
    warmup = warmup_steps(cfg, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        return after_warmup(cfg, min(1.0, (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_ema(model: nn.Module, decay: float) -> StepEma | None:
    """The EMA of `model`'s weights at `decay` (kit/ema.py), or None when `train.ema_decay` is 0."""
    if not decay:
        return None
    from .ema import StepEma  # timm loads only for a run that averages (kit/ema.py)

    return StepEma(model, decay)


def bce_loss(loss_cfg: LossConfig, device: torch.device):
    pos_weight = torch.tensor(loss_cfg.pos_weight, device=device)     # made once, not per step
    return lambda logits, targets: nn.functional.binary_cross_entropy_with_logits(logits, targets,
                                                                                  pos_weight=pos_weight)


def focal_loss(loss_cfg: LossConfig, device: torch.device):
    from torchvision.ops import sigmoid_focal_loss  # torchvision loads only for the focal loss (start-up time)

    return lambda logits, targets: sigmoid_focal_loss(logits, targets, alpha=loss_cfg.focal_alpha,
                                                      gamma=loss_cfg.focal_gamma, reduction="mean")


LOSS_FUNCTIONS = {"bce": bce_loss, "focal": focal_loss}     # loss.name → a builder of the loss on logits


def build_loss(loss_cfg: LossConfig, device: torch.device):
    """Training loss on logits (LOSS_FUNCTIONS), after optional label smoothing."""
    loss = LOSS_FUNCTIONS[loss_cfg.name](loss_cfg, device)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if loss_cfg.label_smoothing:
            targets = targets * (1 - loss_cfg.label_smoothing) + 0.5 * loss_cfg.label_smoothing
        return loss(logits, targets)

    return loss_fn


def validation_loss(loss_fn, logits: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """The training loss (`loss_fn`, every loss option included) on held-out logits: history.csv's val_loss, on the
    same scale as its train_loss."""
    with torch.no_grad():
        return float(loss_fn(torch.as_tensor(logits, dtype=torch.float32, device=device),
                             torch.as_tensor(labels, dtype=torch.float32, device=device)))


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


STALL_MIN_STEPS = 50       # fewer steps than this (a tiny set's first epochs) say nothing yet about learning


def stall_warning(cfg: Config, fold: int, epoch: int, train_loss: float, plateau: float,
                  advice: str | None = None, steps: int = STALL_MIN_STEPS) -> str | None:
    """One line when the train loss sits at the prior's after `steps` training steps (at least STALL_MIN_STEPS);
    `advice`: what the training method suggests instead of the recipe's own."""
    if steps < STALL_MIN_STEPS or not is_stalled(train_loss, plateau):
        return None
    advice = advice or ("model.name=baseline_bn (the same CNN with normalisation layers, which leaves the plateau "
                        "on every seed), or optimizer.lr=3e-4" if cfg.model.name == "baseline" else
                        "a lower optimizer.lr, a warm-up (schedule.warmup_epochs), or check model.pretrained_file")
    return (f"warning: fold {fold} epoch {epoch}: train loss {train_loss:.4f} is within {STALL_TOLERANCE:.0%} of "
            f"{plateau:.4f}, the loss of predicting the prior for every patch: the model has not started learning; "
            f"try {advice}")


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze everything but the head (frozen parameters get no gradient, so no update); what
    `model.trainable_blocks` froze for good stays frozen."""
    head_names = head_parameter_names(model)
    frozen = getattr(model, "frozen_parameter_names", set())
    for name, parameter in model.named_parameters():
        if name not in head_names and name not in frozen:
            parameter.requires_grad_(trainable)


def hold_backbone(optimizer: torch.optim.Optimizer, scheduler, held: bool) -> None:
    """Freeze by a zero learning rate (what `train.compile` uses): the graph stays the same, so the compiled model
    is not recompiled at the unfreeze, as it would be when `requires_grad` changes. Released, each group gets the
    rate its schedule gives now (schedulers compute it from the step, never from the current value)."""
    for group, scheduled in zip(optimizer.param_groups, scheduler.get_last_lr()):
        if group["name"].startswith("backbone"):
            group["lr"] = 0.0 if held else scheduled


@dataclass
class TrainingParts:
    """What one optimisation step needs besides the model and the batch."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: object
    grad_clip: float = 0.0
    ema: StepEma | None = None         # updated after every step, its warm-up driven by the step count


def build_training_parts(cfg: Config, model: nn.Module, steps_per_epoch: int,
                         amp_dtype: torch.dtype | None) -> TrainingParts:
    """Optimizer, schedule, loss scaler (fp16 only: bf16 needs no scaling), loss and EMA for `model` on its device."""
    device = next(model.parameters()).device
    optimizer = build_optimizer(cfg, model)
    return TrainingParts(
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        loss_fn=build_loss(cfg.loss, device),
        grad_clip=cfg.optimizer.grad_clip,
        ema=step_ema(model, cfg.train.ema_decay))


def train_one_epoch(model, batches, parts: TrainingParts, device, amp_dtype, desc: str | None,
                    check_every: int = 20, hold_backbone_lr: bool = False, on_check=None):
    """One pass over `batches` ((inputs, labels) on the device); returns (mean loss, images per second).
    A progress bar shows loss and images/s (none when `desc` is None).

    The loss is summed on the device and read back every `check_every` steps (to check it and update the bar):
    reading it every step would make the CPU wait for the GPU instead of queueing the next batch. Nothing else in
    the loop waits for the GPU (tests/test_device.py checks every copy).
    `hold_backbone_lr`: the backbone is frozen by a zero learning rate (`hold_backbone`). `on_check(steps, images)`
    runs after each read-back, when the device has caught up (the fold's clock times the steps there).
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
                if on_check is not None:
                    on_check(step, seen)
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
