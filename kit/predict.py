"""Fold ensemble with test-time augmentation (ttach): each fold's best checkpoint × the TTA views, averaged.

Probabilities are averaged (over views, then over folds), so the ensemble output is itself a probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from .array_cache import resident_images
from .augment import build_transform
from .checkpoints import model_from_best
from .config import Config
from .data import cache_dir_for, check_data_dir, load_split_images, read_sample_submission
from .device import autocast_dtype, select_device
from .errors import KitError
from .experiment import FinishedFold, check_split_against_data, epochs_note, finished_folds, train_all_command
from .inference import predict_tta_probabilities, tta_view_count
from .progress import say
from .runs import RECORD, fold_dir, read_json


def find_fold_checkpoints(cfg: Config, allow_missing_folds: bool) -> list[FinishedFold]:
    """The experiment's finished folds (runs.py decides which); missing ones are named, and used only when allowed.
    Folds trained with another config, or on a split of other labels, are refused."""
    found, missing = finished_folds(cfg)
    why = "; ".join(f"fold {fold} {reason}" for fold, reason in missing.items())
    if not found:
        raise KitError(f"no finished fold of `{cfg.name}` under {fold_dir(cfg, 0).parent} ({why}): "
                       f"run `{train_all_command(cfg)}` (or `make train FOLD=0`) first")
    if missing and not allow_missing_folds:
        raise KitError(f"`{cfg.name}` lacks finished folds {', '.join(map(str, missing))} of {cfg.folds.n_splits} "
                       f"({why}): train them (`make train-all`), or pass ALLOW_MISSING_FOLDS=1 to predict with "
                       f"folds {', '.join(str(f.fold) for f in found)}")
    check_split_against_data(cfg, [f.fold for f in found])
    return found


def oof_auc(checkpoints: list[FinishedFold]) -> float:
    """AUC of the pooled out-of-fold predictions (each with the fold's TTA views) of the folds used."""
    pooled = pd.concat([c.oof for c in checkpoints])
    return float(roc_auc_score(pooled["label"], pooled["pred"]))


@dataclass
class Prediction:
    ids: list[str]                # sample_submission order
    probabilities: np.ndarray     # fold-mean of TTA-mean probabilities
    folds: list[FinishedFold]
    cv_auc: float
    views: str


def predict_test(cfg: Config, allow_missing_folds: bool = False, log=say) -> Prediction:
    """Predict the test set with every finished fold × TTA views and average the folds."""
    checkpoints = find_fold_checkpoints(cfg, allow_missing_folds)
    note = epochs_note(cfg, checkpoints)
    if note:
        log(note)
    data_dir = check_data_dir(cfg.data_dir)
    test_ids = read_sample_submission(data_dir)["id"].tolist()
    images = load_split_images(data_dir, "test", test_ids, cache_dir_for(cfg, data_dir))
    device = select_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.amp, cfg.amp_dtype)
    images = resident_images(images, device)      # uploaded once for every fold when it fits in GPU memory
    log(f"{cfg.name}: predicting {len(test_ids):,} test images with folds "
        f"{', '.join(str(c.fold) for c in checkpoints)} × {tta_view_count(cfg.tta.views)} TTA views ({cfg.tta.views})")
    valid_transform = build_transform(cfg.augment.valid, "augment.valid")      # as the OOF predictions had
    fold_probabilities = []
    for checkpoint in checkpoints:
        model, _ = model_from_best(checkpoint.best)
        model = model.to(device).to(memory_format=torch.channels_last)
        fold_probabilities.append(predict_tta_probabilities(
            model, images, cfg.tta.views, cfg.eval_batch_size, device, amp_dtype, desc=f"fold {checkpoint.fold} TTA",
            transform=valid_transform))
        log(f"  fold {checkpoint.fold}: OOF AUC {oof_auc([checkpoint]):.4f} ({tta_view_count(cfg.tta.views)} views)")
    cv_auc = oof_auc(checkpoints)
    log(f"{cfg.name}: CV AUC (out-of-fold, {len(checkpoints)} folds, {tta_view_count(cfg.tta.views)} TTA views) "
        f"{cv_auc:.4f}")
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


def check_members_share_folds(configs: list[Config], allow_missing_folds: bool) -> None:
    """Blend weights are chosen on the members' pooled OOF predictions, which only compare when every member
    holds out the same rows: the same finished folds of the same split file. Checked before any test prediction."""
    described = {}
    for cfg in configs:
        found = find_fold_checkpoints(cfg, allow_missing_folds)
        splits = sorted({(read_json(f.directory / RECORD) or {}).get("split", {}).get("file", "?") for f in found})
        described[cfg.name] = (tuple(f.fold for f in found), cfg.folds.n_splits, tuple(splits))
    if len(set(described.values())) > 1:
        shown = "; ".join(f"`{name}` folds {', '.join(map(str, folds))} of {k} ({', '.join(splits)})"
                          for name, (folds, k, splits) in described.items())
        raise KitError(f"blend members must hold out the same rows, but {shown}: blend experiments trained on the "
                       f"same split (folds.n_splits, folds.seed, folds.groups_csv) with the same folds finished "
                       f"(nothing was predicted)")


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
                  log=say) -> Blend:
    """Each experiment's fold ensemble × TTA, blended with weights chosen on their pooled OOF predictions."""
    if method not in BLEND_METHODS:
        raise KitError(f"blend method must be one of {', '.join(BLEND_METHODS)}, got {method!r}")
    names = [cfg.name for cfg in configs]
    if len(set(names)) != len(names) or not 2 <= len(names) <= MAX_BLEND_MEMBERS:
        raise KitError(f"blend 2 to {MAX_BLEND_MEMBERS} different experiments, got {', '.join(names)}")
    check_members_share_folds(configs, allow_missing_folds)        # before predicting anything
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
