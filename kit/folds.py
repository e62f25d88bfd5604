"""k-fold split, written once per data set, k, seed (and grouping), and reused by every fold of every experiment.

Stratified on the label. With `folds.groups_csv` (id → slide, as the public PCam slide mapping gives) the split is
StratifiedGroupKFold: patches of one slide never sit on both sides of a fold, which would inflate CV.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .errors import KitError
from .io import atomic_write_csv


def read_groups(path: str | Path, ids: pd.Series, log=print) -> np.ndarray:
    """One group label per id: the CSV's `id` column and its one other column (e.g. `wsi` or `slide`).

    Ids the CSV does not list become groups of their own, and the count is reported.
    """
    path = Path(path)
    if not path.is_file():
        raise KitError(f"config `folds.groups_csv`: {path} not found (an id → slide CSV)")
    table = pd.read_csv(path, dtype=str)
    others = [c for c in table.columns if c != "id"]
    if "id" not in table.columns or len(others) != 1:
        raise KitError(f"{path}: expected two columns, `id` and the group (e.g. `id,wsi`); found "
                       f"`{','.join(table.columns)}`")
    duplicated = table["id"].duplicated()
    if duplicated.any():
        raise KitError(f"{path}: id {table['id'][duplicated].iloc[0]} appears twice (line "
                       f"{int(np.flatnonzero(duplicated.to_numpy())[0]) + 2})")
    group_of = dict(zip(table["id"], table[others[0]]))
    groups = ids.map(group_of)
    ungrouped = groups.isna()
    if ungrouped.any():
        log(f"{path}: {int(ungrouped.sum()):,} of {len(ids):,} ids have no group; each becomes a group of its own")
        groups[ungrouped] = "__own__" + ids[ungrouped]
    return groups.to_numpy()


def assign_folds(labels: pd.DataFrame, n_splits: int, seed: int, groups: np.ndarray | None = None) -> pd.DataFrame:
    """Return `id,label,fold` with each row's validation fold; stratified on the label (and grouped if given)."""
    counts = labels["label"].value_counts()
    if counts.min() < n_splits or len(counts) < 2:
        raise KitError(f"cannot make {n_splits} stratified folds: each class needs at least {n_splits} images "
                       f"(found {counts.to_dict()}); lower folds.n_splits")
    if groups is not None and len(set(groups)) < n_splits:
        raise KitError(f"cannot make {n_splits} grouped folds from {len(set(groups))} groups; lower folds.n_splits")
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for fold_index, (_, valid_rows) in enumerate(splitter.split(np.zeros(len(labels)), labels["label"], groups)):
        fold[valid_rows] = fold_index
    return labels[["id", "label"]].assign(fold=fold)


def fingerprint(*columns) -> str:
    digest = hashlib.sha1()
    for column in columns:
        digest.update(pd.util.hash_pandas_object(pd.Series(column), index=False).values.tobytes())
    return digest.hexdigest()


def load_or_make_folds(labels: pd.DataFrame, n_splits: int, seed: int, folds_dir: str | Path,
                       groups_csv: str = "", log=print) -> pd.DataFrame:
    """The split for this data set, k, seed and grouping: read from `folds_dir` if written before, else written."""
    groups = read_groups(groups_csv, labels["id"], log=log) if groups_csv else None
    key = fingerprint(labels["id"], labels["label"], *([groups] if groups is not None else []))
    kind = "grouped" if groups is not None else "stratified"
    path = Path(folds_dir) / f"folds-{key[:12]}-{kind}-k{n_splits}-seed{seed}.csv"
    if path.exists():
        folds = pd.read_csv(path, dtype={"id": str})
        if folds["id"].tolist() == labels["id"].tolist():
            return folds
    folds = assign_folds(labels, n_splits, seed, groups)
    atomic_write_csv(path, folds if groups is None else folds.assign(group=groups))
    return folds
