"""An experiment's folds taken together: which are finished (what predict, report and blend use), the config they
were trained with (what predict, report and blend run with, but for the keys the command sets), which `train-all`
has work for, whether every fold still sits on the split today's labels make, and the experiment's results copied
elsewhere (a Kaggle notebook's outputs). One fold's folder and its rules are kit/runs.py's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import CONFIGS_DIR, EXTENSIBLE_SCHEDULES, Config, apply_overrides, to_dict
from .data import check_data_dir, read_train_labels
from .errors import KitError
from .folds import describe_label_change, split_path
from .io import atomic_path, path_inside
from .progress import say
from .runs import (
    BEST,
    CONFIG,
    HISTORY,
    METRICS,
    NEUTRAL_KEYS,
    OOF,
    OUTPUT_FILES,
    PREDICT_NEUTRAL_KEYS,
    RECORD,
    FoldRun,
    config_differences,
    experiment_dir,
    fold_dir,
    read_json,
    read_oof,
    read_recorded_config,
    read_status,
)


@dataclass
class FinishedFold:
    fold: int
    directory: Path
    metrics: dict
    oof: pd.DataFrame = field(repr=False)
    history: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def best(self) -> Path:
        return self.directory / BEST


def train_all_command(cfg: Config) -> str:
    """The `make train-all` that trains this experiment's folds: its shipped config when the name is one, else the
    experiment's name passed on the configs' defaults."""
    shipped = CONFIGS_DIR / f"{cfg.name}.yaml"
    return (f"make train-all CONFIG=configs/{cfg.name}.yaml" if shipped.is_file() else
            f"make train-all CONFIG=<the config file that names `{cfg.name}`>")


def check_split(cfg: Config, split_key: str, labels: pd.DataFrame, folds=None) -> None:
    """Refuse when a fold (of `folds`, else any) was trained on a split made from other labels than `labels`."""
    stale = []
    for fold in range(cfg.folds.n_splits) if folds is None else folds:
        record = read_json(fold_dir(cfg, fold) / RECORD) or {}
        if record.get("split", {}).get("key", split_key) != split_key:
            stale.append(fold)
    if stale:
        record = read_json(fold_dir(cfg, stale[0]) / RECORD)
        change = describe_label_change(Path(cfg.out_dir) / "folds" / record["split"]["file"], labels)
        trained_on = (read_recorded_config(fold_dir(cfg, stale[0]) / CONFIG) or cfg).data_dir
        if Path(trained_on).resolve() != Path(cfg.data_dir).resolve():      # another data folder, not new labels
            where = trained_on if Path(trained_on).is_dir() else f"<the folder recorded as {trained_on}, not found here>"
            raise KitError(f"fold{'s' if len(stale) > 1 else ''} {', '.join(map(str, stale))} of `{cfg.name}` "
                           f"{'were' if len(stale) > 1 else 'was'} split from the labels in "
                           f"{trained_on} (the data folder recorded by the folds), but the data folder now is "
                           f"{cfg.data_dir}, whose train_labels.csv differs ({change}): pass DATA_DIR={where}, or "
                           f"train under a new name (name=<new name>) on this data")
        raise KitError(f"train_labels.csv changed since fold {', '.join(map(str, stale))} of `{cfg.name}` was split "
                       f"({change}): those models saw rows that are now in other folds' validation sets; start "
                       f"afresh with `make train-all FORCE=1`, or train under a new name (name=<new name>)")


def check_split_against_data(cfg: Config, folds=None, labels: pd.DataFrame | None = None) -> None:
    """`check_split` with the key of the split that `cfg.data_dir`'s train_labels.csv (and groups) make today
    (`labels`: that file, when the caller has read it already)."""
    labels = read_train_labels(check_data_dir(cfg.data_dir)) if labels is None else labels
    _, key, _ = split_path(labels, cfg.folds, Path(cfg.out_dir) / "folds", log=lambda *_: None)
    check_split(cfg, key, labels, folds)


def folds_to_train(cfg: Config, force: bool = False) -> list[int]:
    """The folds `train-all` has work for: all with `force`, else those not finished under this config (a fold
    finished under another config is included: training it says why it is refused)."""
    pending = []
    for fold in range(cfg.folds.n_splits):
        try:
            skip = FoldRun(cfg, fold).decide(force).action == "skip"
        except KitError:
            skip = False          # refused: the fold's own run says why, in its log
        if not skip:
            pending.append(fold)
    return pending


def finished_folds(cfg: Config, neutral=PREDICT_NEUTRAL_KEYS) -> tuple[list[FinishedFold], dict[int, str]]:
    """The experiment's finished folds (trained with this config) and, for the others, why they are not counted.

    A fold counts when the run it was started for finished, whatever `epochs` says now (`epochs_note` tells the
    user); a fold trained with another config is refused, naming the keys: its numbers would describe a model
    other than the one asked for. (`check_split` then tells whether their split still fits the labels.)
    """
    found, missing = [], {}
    for fold in range(cfg.folds.n_splits):
        run = FoldRun(cfg, fold)
        status = run.status()
        comparison = run.compare(status, neutral | {"epochs"})
        if not status.complete:
            if status.run_finished:
                missing[fold] = f"finished but lacks {', '.join(status.missing_outputs)}"
            elif status.metrics is not None and status.recorded is None:
                missing[fold] = f"has {METRICS} but no {CONFIG} saying what trained it"
            elif status.recorded is None and not status.has_checkpoint:
                missing[fold] = "not trained"
            else:
                target = status.recorded.epochs if status.recorded is not None else cfg.epochs
                missing[fold] = f"unfinished, {status.epochs_trained} of {target} epochs"
            continue
        if comparison.differences:
            raise run.mismatch_error(comparison)
        history = status.directory / HISTORY
        found.append(FinishedFold(fold, status.directory, status.metrics, read_oof(status.directory / OOF),
                                  pd.read_csv(history) if history.is_file() else None))
    return found, missing


# ----------------------------------------------------------------------------------------------------------------
# The config the folds were trained with: what predict, report and blend run with
# ----------------------------------------------------------------------------------------------------------------

def recorded_config(cfg: Config) -> tuple[Config, Path] | None:
    """The config that trained the experiment's first finished fold, and its file; None while no fold is finished.
    The folds are found by folder (fold<k>/), not by `folds.n_splits`, which may be a key the command has wrong."""
    directory = experiment_dir(cfg)
    numbers = sorted(int(path.name[4:]) for path in directory.glob("fold*")
                     if path.is_dir() and path.name[4:].isdigit()) if directory.is_dir() else []
    for fold in numbers:
        status = read_status(directory / f"fold{fold}", fold)
        if status.complete:
            return status.recorded, status.directory / CONFIG
    return None


def _value_at(values: dict, dotted_key: str):
    for part in dotted_key.split("."):
        values = values[part]
    return values


def _as_override(key: str, value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return f"{key}={text if len(text) <= 60 else text[:57] + '…'}"


def with_recorded_config(cfg: Config, explicit: Collection[str], log=say) -> Config:
    """`cfg` as predict, report and blend run it: the config recorded by the experiment's finished folds, except
    the keys this command set (`explicit`: its overrides, data_dir when DATA_DIR was given) and where and how fast
    this machine runs (runs.NEUTRAL_KEYS: out_dir, device, …). The data folder is the one the folds recorded when it
    exists here and none was given. A set key that contradicts the folds is refused naming both values (the folds
    are right, the command is not: never FORCE=1); `epochs` is not (`epochs_note` tells). `cfg` itself while no fold
    is finished."""
    found = recorded_config(cfg)
    if found is None:
        return cfg
    recorded, source = found
    command = to_dict(cfg)
    kept = {key: _value_at(command, key) for key in set(explicit) | NEUTRAL_KEYS}
    if "data_dir" not in explicit and Path(recorded.data_dir).is_dir():
        kept["data_dir"] = recorded.data_dir
    effective = apply_overrides(recorded, kept)
    conflicts = [(key, old, new) for key, old, new in config_differences(recorded, effective, PREDICT_NEUTRAL_KEYS)
                 if key != "epochs"]
    if conflicts:
        these = "that value" if len(conflicts) == 1 else "those values"
        raise KitError(f"{', '.join(_as_override(key, new) for key, _, new in conflicts)} on this command "
                       f"contradict{'s' if len(conflicts) == 1 else ''} the finished folds of `{cfg.name}`, trained "
                       f"with {', '.join(_as_override(key, old) for key, old, _ in conflicts)} ({source}): pass "
                       f"{these} (or leave {'it' if len(conflicts) == 1 else 'them'} out) to use the folds, or train "
                       f"under a new name (name=<new name>) for folds with {'it' if len(conflicts) == 1 else 'them'}")
    adopted = config_differences(cfg, effective, PREDICT_NEUTRAL_KEYS)
    if adopted:
        log(f"using the config recorded by the finished folds of `{cfg.name}` ({source}) for the keys this command "
            f"did not set: {', '.join(_as_override(key, new) for key, _, new in adopted)}")
    if Path(effective.data_dir).resolve() != Path(cfg.data_dir).resolve():
        log(f"using data folder {effective.data_dir} recorded by the experiment's folds (not {cfg.data_dir}; "
            f"DATA_DIR=… picks another)")
    return effective


def epochs_note(cfg: Config, folds: list[FinishedFold]) -> str | None:
    """One line when finished folds ran for another number of epochs than the config now says (and did not stop
    early): they are used as they are, and `make train-all` would extend them."""
    other = {}
    for fold in folds:
        trained = int(fold.metrics.get("epochs_trained", cfg.epochs))
        if trained != cfg.epochs and not fold.metrics.get("stopped_early"):
            other.setdefault(trained, []).append(str(fold.fold))
    if not other:
        return None
    parts = "; ".join(f"fold{'s' if len(f) > 1 else ''} {', '.join(f)} for {n}" for n, f in sorted(other.items()))
    shorter = any(n < cfg.epochs for n in other)
    hint = (f"; `make train-all` would extend the shorter ones to {cfg.epochs} epochs"
            if shorter and cfg.schedule.name in EXTENSIBLE_SCHEDULES else "")
    return (f"note: `{cfg.name}` uses its finished folds as trained, not for the config's {cfg.epochs} epochs "
            f"({parts}){hint}")


def copy_outputs(cfg: Config, destination: str | Path) -> list[Path]:
    """The experiment's results copied to `destination`/<experiment>/: every fold's files but last.pt (resume state,
    2-3× the weights), and the experiment's report and figures. What a Kaggle notebook keeps as its output while
    its runs live in scratch space. Returns the files written."""
    source, target = experiment_dir(cfg), path_inside(destination, cfg.name)
    if source.resolve() == target.resolve():
        return []
    written = []
    wanted = [path for path in source.glob("*") if path.is_file() and path.suffix in (".md", ".png", ".json")]
    for fold in range(cfg.folds.n_splits):
        wanted += [fold_dir(cfg, fold) / name for name in OUTPUT_FILES if (fold_dir(cfg, fold) / name).is_file()]
    for path in wanted:
        copy = target / path.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(copy) as tmp:
            shutil.copyfile(path, tmp)
        written.append(copy)
    return written
