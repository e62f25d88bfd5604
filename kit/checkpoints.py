"""Every checkpoint a fold writes, built and read back here, in one dict layout with a `kind` and a `version` (as
timm's CheckpointSaver and nanoGPT's one resume dict do):

  last.pt   kind "last": everything a resume needs, written after every epoch. Common to both training methods:
            `method` (which one wrote it), the run's progress (`FoldProgress`), RNG, precision, process count and
            the config; then the method's own state (`FineTuning.resume_state`: weights, optimizer, schedule, loss
            scale, EMA, SWA average; `HeadOnFrozenFeatures.resume_state`: the head, its optimizer and schedule, and
            the key of the features it was trained on)
  best.pt   kind "best": the weights kept (the best epoch's, or the SWA average) with the config that built them, so
            that `make predict` rebuilds the model from the checkpoint alone

A checkpoint of another kind, an unknown method or a newer version is refused in one line. Files of version 0 (the
kit before kinds existed: the same keys, no `kind`) are read as what their name says. Where they live and when a
fold may be resumed, extended or replaced is kit/runs.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Config, from_dict, to_dict
from .device import precision_name
from .errors import KitError
from .models import build_model, set_frozen_head
from .runs import BEST, LAST, FoldRun

CHECKPOINT_VERSION = 1
KINDS = {LAST: "last", BEST: "best"}             # file name → the kind its dict says it is
METHODS = ("fine-tune", "frozen-features")       # last.pt's `method`: kit/engine.py, kit/features.py


@dataclass
class FoldProgress:
    """Where a fold's run stands: its history.csv rows, the best epoch so far, the last epoch saved."""
    history: list[dict] = field(default_factory=list)
    best_auc: float = -1.0
    best_epoch: int = 0
    epoch: int = 0                   # the last epoch whose last.pt is written (0: none yet)
    stopped_early: bool = False      # early stopping ended the epochs: what is left is finishing the fold

    @property
    def best_val_loss(self) -> float:
        return float(self.history[self.best_epoch - 1]["val_loss"]) if self.best_epoch else float("inf")

    def is_better(self, row: dict) -> bool:
        """A higher val AUC; at the same AUC a lower val loss (an AUC of 1.0 is often reached by an under-confident
        early epoch). An epoch equal on both is no improvement: it keeps the best and counts towards early stopping
        (only a model that did not change scores exactly the same)."""
        return (row["val_auc"] > self.best_auc or
                (row["val_auc"] == self.best_auc and row["val_loss"] < self.best_val_loss))


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def load_checkpoint(path: Path) -> dict:
    """A kit checkpoint's dict: tensors and plain data only, so it loads with `weights_only=True`; a damaged or
    foreign file is one line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KitError(f"checkpoint not found: {path}; train the fold first") from None
    except Exception as err:  # a damaged file, or one holding pickled objects (never executed): name it
        raise KitError(f"cannot read checkpoint {path} ({type(err).__name__}: not a kit checkpoint, or damaged); "
                       f"delete it or retrain the fold with FORCE=1") from None
    if not isinstance(state, dict):
        raise KitError(f"{path} is not a kit checkpoint (it holds a {type(state).__name__}); delete it or retrain "
                       f"the fold with FORCE=1")
    return state


def read_checkpoint(path: Path) -> dict:
    """`load_checkpoint`, checked to be the kind its name says (last.pt or best.pt; a file renamed by the user is
    taken as the kind it says it is) in a version this kit reads."""
    state = load_checkpoint(path)
    expected = KINDS.get(Path(path).name, state.get("kind", KINDS[BEST]))
    kind, version = state.get("kind", expected), state.get("version", 0)
    if kind != expected:
        raise KitError(f"{path} is a `{kind}` checkpoint, not `{expected}`: it was copied or renamed; put it back "
                       f"under its own name, or retrain the fold with FORCE=1")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise KitError(f"{path} was written by a newer kit (checkpoint version {version}; this kit reads up to "
                       f"{CHECKPOINT_VERSION}): update the kit (git pull) to use it")
    if expected == "last" and checkpoint_method(state) not in METHODS:
        raise KitError(f"{path} was written by an unknown training method {checkpoint_method(state)!r}: update "
                       f"the kit, or retrain the fold with FORCE=1")
    return state


def checkpoint_method(state: dict) -> str:
    """The training method a last.pt dict belongs to (version 0 told frozen features apart by a key)."""
    return state.get("method", "frozen-features" if state.get("frozen_features") else "fine-tune")


# ----------------------------------------------------------------------------------------------------------------
# last.pt
# ----------------------------------------------------------------------------------------------------------------

def save_resume(run: FoldRun, cfg: Config, method: str, method_state: dict, amp_dtype, world: int,
                progress: FoldProgress) -> None:
    """last.pt after an epoch: the method's state (`resume_state()`) with the run's progress around it."""
    run.save_checkpoint(LAST, {
        "kind": KINDS[LAST], "version": CHECKPOINT_VERSION, "method": method, **method_state,
        "torch_rng": torch.get_rng_state(), "amp_dtype": precision_name(amp_dtype), "world_size": world,
        "epoch": progress.epoch, "history": progress.history, "best_auc": progress.best_auc,
        "best_epoch": progress.best_epoch, "config": to_dict(cfg)})


def read_resume(run: FoldRun, method: str) -> dict:
    """The fold's last.pt, refused in one line when another training method wrote it."""
    state = read_checkpoint(run.path(LAST))
    if checkpoint_method(state) != method:
        raise KitError(f"{run.label}'s {LAST} was written by {checkpoint_method(state)}, not {method} (the config's "
                       f"train.frozen_features changed): retrain it with FORCE=1")
    return state


def resume_progress(state: dict) -> FoldProgress:
    """The run's progress in a last.pt dict; the RNG put back as it was when it was saved."""
    torch.set_rng_state(state["torch_rng"])
    return FoldProgress(history=state["history"], best_auc=state["best_auc"], best_epoch=state["best_epoch"],
                        epoch=state["epoch"])


def resume_process_count(state: dict) -> int:
    """How many processes trained the run last.pt (`state`) resumes (1 before DDP existed)."""
    return int(state.get("world_size", 1))


# ----------------------------------------------------------------------------------------------------------------
# best.pt
# ----------------------------------------------------------------------------------------------------------------

def save_best(run: FoldRun, cfg: Config, fold: int, model: nn.Module, epoch: int, val_auc: float,
              swa_epochs: int | None = None) -> None:
    """best.pt: the weights kept, their epoch and val AUC, and the config that built them (`swa_epochs`: the SWA
    average of that many epochs)."""
    state = {"kind": KINDS[BEST], "version": CHECKPOINT_VERSION, "model": model.state_dict(), "config": to_dict(cfg),
             "epoch": epoch, "val_auc": val_auc, "fold": fold}
    if swa_epochs is not None:
        state["swa_epochs"] = swa_epochs
    run.save_checkpoint(BEST, state)


def best_weights(path: Path) -> dict:
    """The weights in a best.pt."""
    return read_checkpoint(path)["model"]


def model_from_best(path: Path) -> tuple[nn.Module, Config]:
    """The model a best.pt holds, built from the config saved with it (on the CPU), and that config. Every weight
    comes from the checkpoint: the initial weights (hub or file) are not needed on this machine."""
    state = read_checkpoint(path)
    saved = from_dict(state["config"], source=str(path))
    # the architecture only; a hub model's config.json from the folder it was trained from when that is here, else
    # from the Hugging Face cache
    model = build_model(saved.model, initial_weights=False)
    if saved.train.frozen_features:                       # the head trained on frozen features (kit/features.py)
        set_frozen_head(model, saved.train.frozen_head)
    model.load_state_dict(state["model"])
    return model, saved
