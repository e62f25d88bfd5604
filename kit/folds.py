"""k-fold split, written once per data set, k, seed (and grouping), and reused by every fold of every experiment.

Stratified on the label. With `folds.groups_csv` (id → slide, as the public PCam slide mapping gives) the split is
StratifiedGroupKFold: patches of one slide never sit on both sides of a fold, which would inflate CV.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .config import FoldsConfig
from .errors import KitError
from .io import atomic_write_csv
from .progress import say


def read_groups(path: str | Path, ids: pd.Series, log=say) -> np.ndarray:
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
    counts = {label: int((labels["label"] == label).sum()) for label in (0, 1)}
    rare = min(counts, key=counts.get)
    if counts[rare] < 2:
        # no number of folds helps: a classifier needs both labels, and AUC needs both in every held-out fold
        raise KitError(f"train_labels.csv has {counts[0]:,} negative and {counts[1]:,} positive patches: training "
                       f"needs at least 2 of each label (k-fold needs one per fold); check that the labels are the "
                       f"competition's (or the right file)")
    if counts[rare] < n_splits:
        raise KitError(f"cannot make {n_splits} stratified folds: label {rare} has only {counts[rare]} patches, one "
                       f"per fold is needed; set folds.n_splits={counts[rare]} or fewer (at least 2), or add "
                       f"labelled patches")
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


@dataclass
class Split:
    """A k-fold split and its identity: the file it lives in and the fingerprint of the labels (and groups) it was
    made from. A run folder records `file` and `key`, so a fold trained on other labels can be recognised."""
    folds: pd.DataFrame          # id, label, fold (and group when grouped), in train_labels.csv order
    path: Path
    key: str

    @property
    def record(self) -> dict:
        return {"file": self.path.name, "key": self.key}


def split_path(labels: pd.DataFrame, folds_cfg: FoldsConfig, folds_dir: str | Path,
               log=say) -> tuple[Path, str, np.ndarray | None]:
    """Where the split for these labels, k, seed and grouping lives, its key, and the groups (None: ungrouped)."""
    groups = read_groups(folds_cfg.groups_csv, labels["id"], log=log) if folds_cfg.groups_csv else None
    key = fingerprint(labels["id"], labels["label"], *([groups] if groups is not None else []))
    kind = "grouped" if groups is not None else "stratified"
    path = Path(folds_dir) / f"folds-{key[:12]}-{kind}-k{folds_cfg.n_splits}-seed{folds_cfg.seed}.csv"
    return path, key, groups


def load_split(labels: pd.DataFrame, folds_cfg: FoldsConfig, folds_dir: str | Path, log=say) -> Split:
    """The split for this data set, k, seed and grouping: read from `folds_dir` if written before, else written."""
    path, key, groups = split_path(labels, folds_cfg, folds_dir, log=log)
    if path.exists():
        folds = pd.read_csv(path, dtype={"id": str})
        if folds["id"].tolist() == labels["id"].tolist():
            return Split(folds, path, key)
    folds = assign_folds(labels, folds_cfg.n_splits, folds_cfg.seed, groups)
    atomic_write_csv(path, folds if groups is None else folds.assign(group=groups))
    return Split(folds, path, key)


def describe_label_change(old_split_file: Path, labels: pd.DataFrame) -> str:
    """What differs between the labels a split file was made from and `labels`, in words."""
    if not old_split_file.is_file():
        return "the labels (or groups) differ from those its folds were made from"
    old = pd.read_csv(old_split_file, dtype={"id": str}).set_index("id")
    new = labels.set_index("id")
    added, removed = new.index.difference(old.index), old.index.difference(new.index)
    common = new.index.intersection(old.index)
    changed = int((old.loc[common, "label"].to_numpy() != new.loc[common, "label"].to_numpy()).sum())
    parts = [f"{count:,} {what}" for count, what in ((changed, "label(s) changed"), (len(added), "id(s) added"),
                                                    (len(removed), "id(s) removed")) if count]
    return ", ".join(parts) or "the groups (folds.groups_csv) differ from those its folds were made from"
