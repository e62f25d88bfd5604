"""Stratified k-fold split, written once per data set, k and seed, and reused by every fold of every experiment."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from .errors import KitError
from .io import atomic_write_csv


def assign_folds(labels: pd.DataFrame, n_splits: int, seed: int) -> pd.DataFrame:
    """Return `id,label,fold` with each row's validation fold; stratified on the label."""
    counts = labels["label"].value_counts()
    if counts.min() < n_splits or len(counts) < 2:
        raise KitError(f"cannot make {n_splits} stratified folds: each class needs at least {n_splits} images "
                       f"(found {counts.to_dict()}); lower folds.n_splits")
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for fold_index, (_, valid_rows) in enumerate(splitter.split(np.zeros(len(labels)), labels["label"])):
        fold[valid_rows] = fold_index
    return labels[["id", "label"]].assign(fold=fold)


def labels_fingerprint(labels: pd.DataFrame) -> str:
    return hashlib.sha1(pd.util.hash_pandas_object(labels[["id", "label"]], index=False).values.tobytes()).hexdigest()


def load_or_make_folds(labels: pd.DataFrame, n_splits: int, seed: int, folds_dir: str | Path) -> pd.DataFrame:
    """The split for this data set, k and seed: read from `folds_dir` if written before, else made and written."""
    path = Path(folds_dir) / f"folds-{labels_fingerprint(labels)[:12]}-k{n_splits}-seed{seed}.csv"
    if path.exists():
        folds = pd.read_csv(path, dtype={"id": str})
        if folds["id"].tolist() == labels["id"].tolist():
            return folds
    folds = assign_folds(labels, n_splits, seed)
    atomic_write_csv(path, folds)
    return folds
