"""A fold's run folder, owned here: where each file lives, what "finished" means, the config and the split that
trained the fold, its checkpoints, and the lock that keeps a second process out. Train, predict and report ask this
module; none of them builds a run path or decides "finished" on its own.

    runs/<experiment>/
      fold<k>/
        config.yaml    the effective config that trained the fold (loadable: --config runs/<exp>/fold<k>/config.yaml)
        run.json       what trained it: the config's fingerprint, the split (fold file, label fingerprint), and any
                       `epochs` extensions
        last.pt        everything needed to resume (weights, optimizer, schedule, EMA, RNG, history), every epoch
        best.pt        the weights that validated best (the EMA weights when EMA is on; the SWA average with
                       train.swa_epochs): what `predict` uses
        history.csv    one row per epoch: losses, view-free validation AUC, learning rate, images/s
        oof.csv        best.pt's predictions of the held-out rows with the configured TTA views: id, label, pred
        metrics.json   written last; the fold is finished when it exists and the run reached its epochs or stopped
                       early
      fold<k>.lock     held (flock) by the process training fold k; the OS releases it when that process dies
      fold<k>.log      what a `train-all PARALLEL=N` worker printed while training fold k
      train-all.lock   held by a `train-all PARALLEL=N` parent (one at a time per experiment)
      parallel-config.yaml   the effective config those workers were given
      .fold<k>.new/    a FORCE=1 retrain until its first checkpoint, then swapped in for fold<k>/

Every file is written atomically, and checkpoints hold only tensors and plain data (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

from .config import EXTENSIBLE_SCHEDULES, Config, from_dict, save_config, to_dict
from .errors import KitError
from .io import (
    atomic_torch_save,
    atomic_write_csv,
    atomic_write_json,
    path_inside,
    process_lock,
    remove_temp_files,
)

LAST, BEST, HISTORY, OOF, METRICS, CONFIG, RECORD = (
    "last.pt", "best.pt", "history.csv", "oof.csv", "metrics.json", "config.yaml", "run.json")
RUN_FILES = (LAST, BEST, HISTORY, OOF, METRICS, CONFIG, RECORD)
OUTPUT_FILES = tuple(name for name in RUN_FILES if name != LAST)     # a fold's results, without its resume state

# Keys that say where or how fast a run goes, not what it computes: changing them never blocks a resume.
NEUTRAL_KEYS = frozenset({"name", "data_dir", "out_dir", "cache_dir", "submissions_dir", "device", "num_workers",
                          "eval_batch_size", "amp", "amp_dtype", "train.compile", "train.channels_last",
                          # the trackers (`log:`) watch a run
                          "log.tensorboard", "log.wandb.project", "log.wandb.mode", "log.wandb.entity",
                          "log.mlflow.tracking_uri", "log.mlflow.experiment"})
# At prediction the weights come from best.pt, so where the initial weights came from no longer matters.
PREDICT_NEUTRAL_KEYS = NEUTRAL_KEYS | {"model.pretrained", "model.pretrained_file"}


def experiment_dir(cfg: Config) -> Path:
    """runs/<experiment>/, refused unless it is inside out_dir (the schema already keeps names to one component)."""
    return path_inside(cfg.out_dir, cfg.name)


def parallel_config_path(cfg: Config) -> Path:
    """The effective config (overrides included) that `train-all PARALLEL=N` hands its workers."""
    return experiment_dir(cfg) / "parallel-config.yaml"


def fold_log_path(cfg: Config, fold: int) -> Path:
    """The log of a fold trained by a `train-all PARALLEL=N` worker (beside the fold's folder, which a fresh run
    replaces: the log of every attempt stays)."""
    return experiment_dir(cfg) / f"fold{fold}.log"


def fold_dir(cfg: Config, fold: int) -> Path:
    return experiment_dir(cfg) / f"fold{fold}"


# ----------------------------------------------------------------------------------------------------------------
# Configs: which keys change a result, their fingerprint, and what differs
# ----------------------------------------------------------------------------------------------------------------

def flat_config(cfg: Config, neutral=NEUTRAL_KEYS) -> dict:
    """`{"optimizer.lr": 0.001, …}` without the neutral keys; lists (augmentations) stay whole values."""
    def walk(values: dict, prefix: str):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            elif prefix + key not in neutral:
                yield prefix + key, value
    return dict(walk(to_dict(cfg), ""))


def config_fingerprint(cfg: Config) -> str:
    """A short hash of every key that changes what training computes."""
    text = json.dumps(flat_config(cfg), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def config_differences(old: Config, new: Config, neutral=NEUTRAL_KEYS) -> list[tuple[str, object, object]]:
    before, after = flat_config(old, neutral), flat_config(new, neutral)
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def describe_differences(differences) -> str:
    return "; ".join(f"{key}: {_show(old)} → {_show(new)}" for key, old, new in differences)


# ----------------------------------------------------------------------------------------------------------------
# One fold's folder
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class FoldStatus:
    """What a fold's folder says about itself, read without judging it against any config."""
    fold: int
    directory: Path
    recorded: Config | None = None     # the config that trained it (config.yaml)
    metrics: dict | None = None        # metrics.json, when written
    has_checkpoint: bool = False       # last.pt exists: there is training to resume or extend

    @property
    def run_finished(self) -> bool:
        """metrics.json is there and the run it was started for reached its own epochs or stopped early. Such a
        fold is never retrained or deleted without FORCE, whatever else it lacks (last.pt is only needed to
        extend it)."""
        if self.metrics is None or self.recorded is None:
            return False
        return bool(self.metrics.get("stopped_early")) or self.metrics.get("epochs_trained", 0) >= self.recorded.epochs

    @property
    def missing_outputs(self) -> list[str]:
        """The result files predict and report need that the folder lacks."""
        return [name for name in (BEST, OOF) if not (self.directory / name).is_file()]

    @property
    def complete(self) -> bool:
        """A finished run with every result file: what predict, report and blend use."""
        return self.run_finished and not self.missing_outputs

    @property
    def epochs_trained(self) -> int:
        if self.metrics is not None:
            return int(self.metrics.get("epochs_trained", 0))
        history = self.directory / HISTORY
        return len(pd.read_csv(history)) if history.is_file() else 0


@dataclass
class Comparison:
    """A fold's recorded config against the one asked for."""
    differences: list            # (key, old, new) that block using or resuming the fold
    extension: tuple | None      # (old epochs, new epochs) when `epochs` was raised on a schedule that allows it


# What an unfinished first epoch can leave in fold<k>/ (best.pt and history.csv are written before last.pt):
# the only files a fresh start may delete without FORCE.
FIRST_EPOCH_LEFTOVERS = frozenset({CONFIG, RECORD, BEST, HISTORY})


@dataclass
class FoldDecision:
    """The one answer to "what may training do with this fold's folder", which train, train-all (sequential,
    fold-parallel, DDP) and kaggle-run all ask for (`decide`)."""
    action: str                        # "skip" (finished) | "resume" (from last.pt) | "fresh" (from epoch 1)
    status: FoldStatus
    extension: tuple | None = None     # resume: (old, new) epochs when a raised `epochs` continues a finished run
    replaces: bool = False             # fresh under FORCE=1 over a folder with files: staged beside it, swapped in


def _writer_only(method):
    """A FoldRun method that changes the folder: it does nothing on a FoldRun made with `writes=False`."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        return method(self, *args, **kwargs) if self.writes else None
    return guarded


class FoldRun:
    """The files of one fold. `directory` is fold<k>/, or .fold<k>.new/ while a FORCE=1 retrain has no checkpoint.

    Under DDP rank 0 alone owns the folder: the other ranks hold a `FoldRun(writes=False)`, whose methods that
    write (`_writer_only`) do nothing, so the engine runs the same steps on every rank.
    """

    def __init__(self, cfg: Config, fold: int, writes: bool = True):
        self.cfg, self.fold, self.writes = cfg, fold, writes
        self.experiment_dir = experiment_dir(cfg)
        self.final_dir = fold_dir(cfg, fold)
        self.staging_dir = self.experiment_dir / f".fold{fold}.new"
        self.trash_dir = self.experiment_dir / f".fold{fold}.old"
        self.directory = self.final_dir

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def label(self) -> str:
        return f"fold {self.fold} of `{self.cfg.name}`"

    # ---- status and comparison ----------------------------------------------------------------------------------

    def status(self) -> FoldStatus:
        return read_status(self.final_dir, self.fold)

    def compare(self, status: FoldStatus, neutral=NEUTRAL_KEYS) -> Comparison:
        if status.recorded is None:
            return Comparison([], None)
        differences = config_differences(status.recorded, self.cfg, neutral)
        epochs = [d for d in differences if d[0] == "epochs"]
        others = [d for d in differences if d[0] != "epochs"]
        if not epochs:
            return Comparison(others, None)
        _, old, new = epochs[0]
        if new > old and self.cfg.schedule.name in EXTENSIBLE_SCHEDULES:
            return Comparison(others, (old, new))
        return Comparison(differences, None)

    def decide(self, force: bool = False) -> FoldDecision:
        """The run folder's rules, in one place:
        - FORCE=1 trains from epoch 1; a folder with anything in it stays whole until the new run has a checkpoint;
        - a fold whose run finished (metrics.json) is never retrained or deleted: skipped when the config matches,
          extended from last.pt when `epochs` was raised (refused when last.pt is gone, e.g. a fold brought back
          from Kaggle), refused naming the keys when the config differs;
        - an interrupted fold resumes from last.pt (refused under another config);
        - otherwise a fresh start, which deletes only what an unfinished first epoch leaves: any other file in the
          folder is refused, not deleted."""
        status = self.status()
        if force:
            return FoldDecision("fresh", status, replaces=self.final_dir.is_dir() and any(self.final_dir.iterdir()))
        comparison = self.compare(status)
        if status.metrics is not None:
            if status.recorded is None:
                raise KitError(f"{self.label} has results ({METRICS}) but no {CONFIG} saying what trained them: it "
                               f"cannot be checked against this config; restore the file, or retrain it with FORCE=1")
            if comparison.differences:
                raise self.mismatch_error(comparison)
            if status.run_finished and status.missing_outputs:
                raise KitError(f"{self.label} finished but lacks {', '.join(status.missing_outputs)} (in "
                               f"{self.final_dir}): it is kept as it is; restore the file(s), or retrain it with "
                               f"FORCE=1")
            if status.run_finished and (comparison.extension is None or status.metrics.get("stopped_early")):
                return FoldDecision("skip", status)
            if not status.has_checkpoint:
                old, new = comparison.extension or (status.recorded.epochs, self.cfg.epochs)
                raise KitError(f"{self.label} finished {status.epochs_trained} epochs but has no {LAST} (resume "
                               f"state; folds brought back from Kaggle have none) to continue to {new}: it is kept "
                               f"as it is; use it with epochs={old}, or retrain it with FORCE=1")
            return FoldDecision("resume", status, extension=comparison.extension)
        if status.has_checkpoint:
            if comparison.differences:
                raise self.mismatch_error(comparison)
            return FoldDecision("resume", status, extension=comparison.extension)
        foreign = self.foreign_files()
        if foreign:
            raise KitError(f"{self.final_dir} holds {', '.join(foreign[:4])}{' …' if len(foreign) > 4 else ''}, which "
                           f"no unfinished run of the kit leaves: nothing was deleted; move them elsewhere, or pass "
                           f"FORCE=1 to replace the folder")
        return FoldDecision("fresh", status)

    def foreign_files(self) -> list[str]:
        """Entries of fold<k>/ a fresh start must not delete: all but an unfinished first epoch's files."""
        if not self.final_dir.is_dir():
            return []
        return sorted(p.name for p in self.final_dir.iterdir()
                      if p.name not in FIRST_EPOCH_LEFTOVERS or not p.is_file() or p.is_symlink())

    def mismatch_error(self, comparison: Comparison) -> KitError:
        keys = describe_differences(comparison.differences)
        onecycle = any(k == "epochs" for k, _, _ in comparison.differences) and self.cfg.schedule.name == "onecycle"
        why = " (a one-cycle schedule cannot continue past its end)" if onecycle else ""
        return KitError(f"{self.label} was trained with another config ({keys}){why}: retrain it with FORCE=1, or "
                        f"give this config its own runs with name=<new name>")

    # ---- starting, staging, recording ---------------------------------------------------------------------------

    @_writer_only
    def recover_from_crash(self) -> None:
        """Tidy what a killed run left (call it holding the fold's lock): finish a swap that `commit_staging` was
        doing (.fold<k>.new/ and .fold<k>.old/), and delete half-written temporary files of checkpoints and CSVs."""
        if not self.final_dir.exists() and self.staging_dir.is_dir() and (self.staging_dir / LAST).is_file():
            self.staging_dir.rename(self.final_dir)
        shutil.rmtree(self.trash_dir, ignore_errors=True)
        remove_temp_files(self.final_dir)

    @_writer_only
    def start_fresh(self, keep_existing: bool) -> None:
        """Train from epoch 1. With `keep_existing` (FORCE=1 over a trained fold) the new run writes into
        .fold<k>.new/, and the old fold<k>/ stays whole until the new run has a checkpoint (`commit_staging`)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        if keep_existing:
            self.directory = self.staging_dir
        else:
            shutil.rmtree(self.final_dir, ignore_errors=True)     # an unfinished first epoch at most: nothing to keep
        self.directory.mkdir(parents=True, exist_ok=True)

    @_writer_only
    def commit_staging(self) -> None:
        """Swap the retrained fold in for the old one once it has a checkpoint (no-op when not staging)."""
        if self.directory != self.staging_dir:
            return
        if self.final_dir.exists():
            self.final_dir.rename(self.trash_dir)
        self.staging_dir.rename(self.final_dir)
        shutil.rmtree(self.trash_dir, ignore_errors=True)
        self.directory = self.final_dir

    @_writer_only
    def discard_staging(self) -> None:
        if self.directory == self.staging_dir:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            self.directory = self.final_dir

    @_writer_only
    def write_identity(self, split_record: dict, extension: tuple | None = None) -> None:
        """config.yaml (the config now training the fold) and run.json (its fingerprint, split, extensions)."""
        record = read_json(self.path(RECORD)) or {"experiment": self.cfg.name, "fold": self.fold,
                                                  "created": datetime.now().isoformat(timespec="seconds"),
                                                  "extended": []}
        record.update({"config_fingerprint": config_fingerprint(self.cfg), "split": split_record})
        if extension is not None:
            record["extended"].append({"epochs": list(extension),
                                       "at": datetime.now().isoformat(timespec="seconds")})
            self.path(METRICS).unlink(missing_ok=True)      # the fold is no longer finished
        save_config(self.cfg, self.path(CONFIG))
        atomic_write_json(self.path(RECORD), record)

    # ---- files --------------------------------------------------------------------------------------------------

    @_writer_only
    def save_checkpoint(self, name: str, state: dict) -> None:
        atomic_torch_save(self.path(name), state)

    @_writer_only
    def write_history(self, history: list[dict], columns: list[str]) -> None:
        atomic_write_csv(self.path(HISTORY), pd.DataFrame(history, columns=columns))

    @_writer_only
    def write_oof(self, oof: pd.DataFrame) -> None:
        atomic_write_csv(self.path(OOF), oof[["id", "label", "pred"]])

    @_writer_only
    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.path(METRICS), metrics)


def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise KitError(f"{path} is unreadable: retrain the fold with FORCE=1") from None


def read_recorded_config(path: Path) -> Config | None:
    if not path.is_file():
        return None
    try:
        values = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        raise KitError(f"{path} is unreadable: retrain the fold with FORCE=1") from None
    return from_dict(values, source=str(path))


def read_status(directory: Path, fold: int) -> FoldStatus:
    return FoldStatus(fold=fold, directory=directory, recorded=read_recorded_config(directory / CONFIG),
                      metrics=read_json(directory / METRICS),
                      has_checkpoint=(directory / LAST).is_file())


def read_oof(path: Path) -> pd.DataFrame:
    """A fold's oof.csv (id, label, pred), refused with one line when damaged."""
    try:
        oof = pd.read_csv(path, dtype={"id": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise KitError(f"{path} is unreadable ({type(err).__name__}): retrain the fold with FORCE=1") from None
    if not {"id", "label", "pred"} <= set(oof.columns) or oof["pred"].isna().any():
        raise KitError(f"{path}: expected columns id,label,pred with a prediction on every row; retrain the fold "
                       f"with FORCE=1")
    return oof[["id", "label", "pred"]]


# ----------------------------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------------------------

def fold_lock(cfg: Config, fold: int):
    """Hold fold<k>.lock while training: a second process on the fold stops at once, naming the holder."""
    return process_lock(experiment_dir(cfg) / f"fold{fold}.lock",
                        f"fold {fold} of `{cfg.name}` is being trained by {{holder}} ({{path}}); wait for it to end "
                        f"or stop it, then rerun")
