"""Fold ensemble with test-time augmentation (ttach): each fold's best checkpoint × the TTA views, averaged.

Probabilities are averaged (over views, then over folds), so the ensemble output is itself a probability.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import ttach
from sklearn.metrics import roc_auc_score
from torch import nn

from .config import Config, from_dict
from .data import cache_dir_for, check_data_dir, load_split_images, read_sample_submission, resident_images
from .engine import autocast_dtype, fold_dir, load_checkpoint, predict_logits, select_device
from .errors import KitError
from .models import build_model

TTA_TRANSFORMS = {
    "d4": ttach.aliases.d4_transform,          # flips × 90° rotations: 8 views, all label-preserving here
    "hflip": ttach.aliases.hflip_transform,    # 2 views
    "none": None,
}


class Probability(nn.Module):
    """Logit → probability, so TTA averages probabilities rather than logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images).float())


def with_tta(model: nn.Module, views: str) -> nn.Module:
    """The model returning the mean probability over the TTA views (ttach does the flips and rotations)."""
    if TTA_TRANSFORMS[views] is None:
        return Probability(model)
    return ttach.ClassificationTTAWrapper(Probability(model), TTA_TRANSFORMS[views](), merge_mode="mean")


def tta_view_count(views: str) -> int:
    return 1 if TTA_TRANSFORMS[views] is None else len(TTA_TRANSFORMS[views]())


def predict_probabilities(model: nn.Module, images: np.ndarray, views: str, batch_size: int, device,
                          amp_dtype=None, desc: str | None = None) -> np.ndarray:
    """Mean probability over the TTA views for every image of a uint8 (N, 96, 96, 3) array."""
    # predict_logits is the engine's batched inference; here the "logit" is already the TTA-mean probability
    return predict_logits(with_tta(model, views), images, None, batch_size, device, amp_dtype, desc=desc)


@dataclass
class FoldCheckpoint:
    fold: int
    path: Path
    val_auc: float
    oof: pd.DataFrame = field(repr=False)


def find_fold_checkpoints(cfg: Config, allow_missing_folds: bool) -> list[FoldCheckpoint]:
    """The experiment's finished folds; missing ones are named, and used only when explicitly allowed."""
    found, missing = [], []
    for fold in range(cfg.folds.n_splits):
        directory = fold_dir(cfg, fold)
        if (directory / "best.pt").exists() and (directory / "metrics.json").exists():
            oof = pd.read_csv(directory / "oof.csv", dtype={"id": str})
            found.append(FoldCheckpoint(fold, directory / "best.pt", float(roc_auc_score(oof["label"], oof["pred"])),
                                        oof))
        else:
            missing.append(fold)
    if not found:
        raise KitError(f"no trained fold of `{cfg.name}` under {fold_dir(cfg, 0).parent}: "
                       f"run `make train-all CONFIG=...` (or `make train FOLD=0`) first")
    if missing and not allow_missing_folds:
        raise KitError(f"`{cfg.name}` lacks finished folds {', '.join(map(str, missing))} of {cfg.folds.n_splits}: "
                       f"train them (`make train-all`), or pass ALLOW_MISSING_FOLDS=1 to predict with folds "
                       f"{', '.join(str(c.fold) for c in found)}")
    return found


def oof_auc(checkpoints: list[FoldCheckpoint]) -> float:
    """AUC of the pooled out-of-fold predictions of the folds used."""
    pooled = pd.concat([c.oof for c in checkpoints])
    return float(roc_auc_score(pooled["label"], pooled["pred"]))


@dataclass
class Prediction:
    ids: list[str]                # sample_submission order
    probabilities: np.ndarray     # fold-mean of TTA-mean probabilities
    folds: list[FoldCheckpoint]
    cv_auc: float
    views: str


def predict_test(cfg: Config, allow_missing_folds: bool = False, log=print) -> Prediction:
    """Predict the test set with every finished fold × TTA views and average the folds."""
    checkpoints = find_fold_checkpoints(cfg, allow_missing_folds)
    data_dir = check_data_dir(cfg.data_dir)
    test_ids = read_sample_submission(data_dir)["id"].tolist()
    images = load_split_images(data_dir, "test", test_ids, cache_dir_for(cfg.out_dir, data_dir))
    device = select_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.amp)
    images = resident_images(images, device)      # uploaded once for every fold when it fits in GPU memory
    log(f"{cfg.name}: predicting {len(test_ids):,} test images with folds "
        f"{', '.join(str(c.fold) for c in checkpoints)} × {tta_view_count(cfg.tta.views)} TTA views ({cfg.tta.views})")
    fold_probabilities = []
    for checkpoint in checkpoints:
        state = load_checkpoint(checkpoint.path)
        saved = from_dict(state["config"], source=str(checkpoint.path))
        model = build_model(dataclasses.replace(saved.model, pretrained=False))   # weights come from the file
        model.load_state_dict(state["model"])
        model = model.to(device).to(memory_format=torch.channels_last)
        fold_probabilities.append(predict_probabilities(model, images, cfg.tta.views, cfg.eval_batch_size, device,
                                                        amp_dtype, desc=f"fold {checkpoint.fold} TTA"))
        log(f"  fold {checkpoint.fold}: OOF AUC {checkpoint.val_auc:.4f}")
    cv_auc = oof_auc(checkpoints)
    log(f"{cfg.name}: CV AUC (out-of-fold, {len(checkpoints)} folds) {cv_auc:.4f}")
    return Prediction(test_ids, np.mean(fold_probabilities, axis=0), checkpoints, cv_auc, cfg.tta.views)


# ----------------------------------------------------------------------------------------------------------------
# Blending experiments
# ----------------------------------------------------------------------------------------------------------------

BLEND_METHODS = ("mean", "rank")
MAX_BLEND_MEMBERS = 5


def to_ranks(scores: np.ndarray) -> np.ndarray:
    """Scores → their rank as a fraction in (0, 1] (ties share the mean rank); AUC is unchanged."""
    return pd.Series(scores).rank(method="average", pct=True).to_numpy()


def blend(member_scores: list[np.ndarray], weights, method: str) -> np.ndarray:
    """Weighted mean of probabilities, or of their ranks (`rank`: robust when members are calibrated differently)."""
    if method == "rank":
        member_scores = [to_ranks(scores) for scores in member_scores]
    return np.sum([w * np.asarray(s, dtype=np.float64) for w, s in zip(weights, member_scores)], axis=0)


def weight_grid(members: int) -> np.ndarray:
    """Every weight vector on the simplex in steps of 1/20 (2–3 members) or 1/10 (4–5 members)."""
    steps = 20 if members <= 3 else 10

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    return np.array(list(compositions(steps, members)), dtype=np.float64) / steps


def choose_blend_weights(member_oof: list[np.ndarray], labels: np.ndarray, method: str) -> tuple[np.ndarray, float]:
    """The grid weights that maximise the blended out-of-fold AUC (first best in grid order), and that AUC."""
    if method == "rank":
        member_oof = [to_ranks(scores) for scores in member_oof]
    best_weights, best_auc = None, -1.0
    for weights in weight_grid(len(member_oof)):
        auc = roc_auc_score(labels, blend(member_oof, weights, "mean"))
        if auc > best_auc + 1e-12:
            best_weights, best_auc = weights, float(auc)
    return best_weights, best_auc


@dataclass
class Blend:
    ids: list[str]
    probabilities: np.ndarray
    members: list[str]
    weights: np.ndarray
    member_cv_auc: list[float]
    cv_auc: float
    method: str


def predict_blend(configs: list[Config], method: str = "mean", allow_missing_folds: bool = False,
                  log=print) -> Blend:
    """Each experiment's fold ensemble × TTA, blended with weights chosen on their pooled OOF predictions."""
    if method not in BLEND_METHODS:
        raise KitError(f"blend method must be one of {', '.join(BLEND_METHODS)}, got {method!r}")
    names = [cfg.name for cfg in configs]
    if len(set(names)) != len(names) or not 2 <= len(names) <= MAX_BLEND_MEMBERS:
        raise KitError(f"blend 2 to {MAX_BLEND_MEMBERS} different experiments, got {', '.join(names)}")
    predictions = [predict_test(cfg, allow_missing_folds=allow_missing_folds, log=log) for cfg in configs]
    if any(p.ids != predictions[0].ids for p in predictions):
        raise KitError(f"experiments {', '.join(names)} predicted different test sets: use the same data_dir")
    pooled = [pd.concat([c.oof for c in p.folds]).set_index("id") for p in predictions]
    common = pooled[0].index
    for name, oof in zip(names[1:], pooled[1:]):
        if set(oof.index) != set(common):
            raise KitError(f"`{name}` has out-of-fold predictions for other images than `{names[0]}` "
                           f"({len(oof):,} vs {len(common):,}): blend experiments trained on the same data and folds")
    labels = pooled[0].loc[common, "label"].to_numpy()
    member_oof = [oof.loc[common, "pred"].to_numpy() for oof in pooled]
    weights, cv_auc = choose_blend_weights(member_oof, labels, method)
    for name, prediction, w in zip(names, predictions, weights):
        log(f"  {name}: OOF AUC {prediction.cv_auc:.4f}  weight {w:.2f}")
    log(f"blend ({method}) of {' + '.join(names)}: OOF AUC {cv_auc:.4f}")
    return Blend(predictions[0].ids, blend([p.probabilities for p in predictions], weights, method), names, weights,
                 [p.cv_auc for p in predictions], cv_auc, method)
