"""The two checkpoints a fold writes, each built and read back in one place (as timm's CheckpointSaver and nanoGPT's
one resume dict do):

  last.pt   everything a resume needs: weights, optimizer, schedule, loss scale, EMA, SWA average, RNG, precision,
            process count, the config and the run's progress (`FoldProgress`); written after every epoch
  best.pt   the weights kept (the best epoch's, or the SWA average) with the config that built them, so that
            `make predict` rebuilds the model from the checkpoint alone

Where they live and when a fold may be resumed, extended or replaced is kit/runs.py's business; the atomic write
and the one-line error for a damaged file are there too (`FoldRun.save_checkpoint`, `load_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Config, from_dict, to_dict
from .device import precision_name
from .models import build_model, set_frozen_head
from .runs import BEST, LAST, FoldRun, load_checkpoint


@dataclass
class FoldProgress:
    """Where a fold's run stands: its history.csv rows, the best epoch so far, the last epoch saved."""
    history: list[dict] = field(default_factory=list)
    best_auc: float = -1.0
    best_epoch: int = 0
    epoch: int = 0                   # the last epoch whose last.pt is written (0: none yet)
    stopped_early: bool = False      # early stopping ended the epochs: what is left is finishing the fold


def save_resume(run: FoldRun, cfg: Config, model: nn.Module, parts, swa, amp_dtype, world: int,
                progress: FoldProgress) -> None:
    """last.pt after an epoch: what `load_resume` puts back (`parts`: kit.recipe.TrainingParts)."""
    run.save_checkpoint(LAST, {
        "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "swa": swa.state_dict() if swa is not None else None,
        "torch_rng": torch.get_rng_state(), "amp_dtype": precision_name(amp_dtype), "world_size": world,
        "epoch": progress.epoch, "history": progress.history, "best_auc": progress.best_auc,
        "best_epoch": progress.best_epoch, "config": to_dict(cfg)})


def load_resume(state: dict, model: nn.Module, parts, swa) -> FoldProgress:
    """Load last.pt (`state`) into the model, optimizer, schedule, scaler, EMA, SWA average and RNG; return the
    run's progress."""
    model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") and parts.scaler.is_enabled():    # a CPU or bf16 run saved `{}`: nothing to load
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.load_state_dict(state["ema"])
    if swa is not None and state.get("swa") is not None:
        swa.load_state_dict(state["swa"])
    torch.set_rng_state(state["torch_rng"])
    return FoldProgress(history=state["history"], best_auc=state["best_auc"], best_epoch=state["best_epoch"],
                        epoch=state["epoch"])


def resume_process_count(state: dict) -> int:
    """How many processes trained the run last.pt (`state`) resumes (1 before DDP existed)."""
    return int(state.get("world_size", 1))


def save_best(run: FoldRun, cfg: Config, fold: int, model: nn.Module, epoch: int, val_auc: float,
              swa_epochs: int | None = None) -> None:
    """best.pt: the weights kept, their epoch and val AUC, and the config that built them (`swa_epochs`: the SWA
    average of that many epochs)."""
    state = {"model": model.state_dict(), "config": to_dict(cfg), "epoch": epoch, "val_auc": val_auc, "fold": fold}
    if swa_epochs is not None:
        state["swa_epochs"] = swa_epochs
    run.save_checkpoint(BEST, state)


def best_weights(path: Path) -> dict:
    """The weights in a best.pt."""
    return load_checkpoint(path)["model"]


def model_from_best(path: Path) -> tuple[nn.Module, Config]:
    """The model a best.pt holds, built from the config saved with it (on the CPU), and that config. Every weight
    comes from the checkpoint: the initial weights (hub or file) are not needed on this machine."""
    state = load_checkpoint(path)
    saved = from_dict(state["config"], source=str(path))
    # the architecture only; a hub model's config.json from the folder it was trained from when that is here, else
    # from the Hugging Face cache
    model = build_model(saved.model, initial_weights=False)
    if saved.train.frozen_features:                       # the head trained on frozen features (kit/features.py)
        set_frozen_head(model, saved.train.frozen_head)
    model.load_state_dict(state["model"])
    return model, saved
