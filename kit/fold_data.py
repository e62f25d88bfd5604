"""A fold's data, built once and passed down: the data folder checked and train_labels.csv read once per training
(`TrainingSet`), then the fold's rows and the shared image cache (`FoldData`). The fold lifecycle (kit/fold.py)
and both training methods take these ready objects; none of them reads the labels or checks the folder again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config
from .data import cache_dir_for, check_data_dir, load_split_images, read_train_labels
from .errors import KitError
from .folds import Split, load_split


@dataclass
class TrainingSet:
    """The competition's training side as found on disk: read once per `train`."""
    data_dir: Path               # the checked data folder (train/, test/, train_labels.csv, sample_submission.csv)
    labels: pd.DataFrame         # train_labels.csv: id, label


def read_training_set(cfg: Config) -> TrainingSet:
    data_dir = check_data_dir(cfg.data_dir)
    return TrainingSet(data_dir, read_train_labels(data_dir))


@dataclass
class FoldData:
    ids: np.ndarray              # every training id, in train_labels.csv order
    labels: np.ndarray           # 0/1 per id
    images: np.ndarray           # (N, 96, 96, 3) uint8, memory-mapped cache
    train_rows: np.ndarray       # rows of this fold's training part
    valid_rows: np.ndarray       # rows of this fold's held-out part
    split: Split                 # the k-fold split these rows come from (recorded in the run folder)

    @property
    def train_labels(self) -> np.ndarray:
        return self.labels[self.train_rows]

    @property
    def valid_labels(self) -> np.ndarray:
        return self.labels[self.valid_rows]


def check_fold_number(cfg: Config, fold: int) -> None:
    if fold < 0 or fold >= cfg.folds.n_splits:
        raise KitError(f"fold {fold} does not exist: folds.n_splits is {cfg.folds.n_splits} "
                       f"(folds 0..{cfg.folds.n_splits - 1})")


def train_images(cfg: Config, training: TrainingSet) -> np.ndarray:
    """The train split's image cache (built on first need, shared by every fold and experiment on this data)."""
    return load_split_images(training.data_dir, "train", training.labels["id"],
                             cache_dir_for(cfg, training.data_dir))


def fold_data(cfg: Config, fold: int, training: TrainingSet) -> FoldData:
    """The fold's rows of the experiment's split, and the image cache."""
    check_fold_number(cfg, fold)
    split = load_split(training.labels, cfg.folds, Path(cfg.out_dir) / "folds")
    images = train_images(cfg, training)
    fold_of_row = split.folds["fold"].to_numpy()
    train_rows = np.flatnonzero(fold_of_row != fold)
    if cfg.max_train_images:
        train_rows = train_rows[: cfg.max_train_images]
    return FoldData(ids=training.labels["id"].to_numpy(), labels=training.labels["label"].to_numpy(), images=images,
                    train_rows=train_rows, valid_rows=np.flatnonzero(fold_of_row == fold), split=split)


def prepare_shared(cfg: Config, log) -> None:
    """The fold file and the train cache, built once before the processes that share them start training
    (`train-all PARALLEL=N` workers, DDP ranks), so that none of them builds them while the others wait."""
    training = read_training_set(cfg)
    load_split(training.labels, cfg.folds, Path(cfg.out_dir) / "folds")
    images = train_images(cfg, training)
    log(f"shared by the processes: the fold file and the train cache ({len(images):,} images)")
