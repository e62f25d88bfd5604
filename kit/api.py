"""The Python API: one function per make target, for notebooks (Kaggle's included) and for the command line.

    from kit import api
    cfg = api.load_config("baseline_bn", epochs=3)  # a shipped config by name, or a path; keyword overrides
    api.train_all(cfg)                              # or api.train(cfg, fold=0); parallel=2 (or "auto": GPUs)
    path = api.predict(cfg)                         # folds × TTA → validated CSV; returns its path
    api.submit(path)                                # validate, then upload through the Kaggle API
    api.report(cfg)                                 # runs/<experiment>/report.md with figures

Inside a Kaggle notebook, `load_config` ends with the Kaggle notebook step (kit/kaggle_notebook.py's
`kaggle_environment`, which prints one line of what it changed): the competition data is found at
/kaggle/input/histopathologic-cancer-detection, and the image cache (7.7 GB for the competition) and the runs go to
scratch space (/kaggle/temp, else /tmp) wherever the data is, not to /kaggle/working, which keeps at most 20 GB and
is what the notebook's output saves: `keep_outputs` copies there what a user wants back (each fold's best.pt,
metrics, OOF, history; the report), and submissions are written there.
The kit itself can sit on a read-only input.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from . import config as config_module
from .competition import COMPETITION, SAMPLE_SUBMISSION_CSV
from .config import Config
from .errors import Interrupted, KitError
from .io import require_writable_dir
from .kaggle_notebook import competition_input, kaggle_environment
from .progress import say

# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------

def load_config(name_or_path: str | Path = "baseline_bn", overrides: list[str] | dict | None = None,
                **keyword_overrides) -> Config:
    """Load a config (a shipped name such as "baseline", or a path) with `key=value` / keyword overrides, then
    take the Kaggle notebook step (`kaggle_notebook.kaggle_environment`).

    Outside a Kaggle notebook that step changes nothing: the config is `config.load_config`'s. In a notebook it
    takes the attached competition's data when the config's data folder does not exist, and puts the runs and the
    image cache in scratch space wherever the data is, where `out_dir` and `cache_dir` are still the defaults (a
    config or override that sets them, e.g. the one fold-parallel workers get, is kept); one line says what changed.
    """
    merged = config_module.parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    merged.update({key.replace("__", "."): value for key, value in keyword_overrides.items()})
    cfg = config_module.load_config(name_or_path, merged)
    return note_explicit_keys(kaggle_environment(cfg, explicit=merged), merged)


# The keys a call of `load_config` set (its overrides; the CLI's --data-dir and --out arrive as data_dir and out_dir),
# noted on the Config it returns: predict, report and blend take every other key from the folds' recorded config.
_EXPLICIT_KEYS = "_explicit_keys"


def note_explicit_keys(cfg: Config, keys) -> Config:
    setattr(cfg, _EXPLICIT_KEYS, frozenset(keys))       # not a field: equality, to_dict and the fingerprint ignore it
    return cfg


def as_trained(cfg: Config, explicit=None, log=say) -> Config:
    """The config predict, report and blend run with (`experiment.with_recorded_config`): the one the experiment's
    finished folds were trained with, but for the keys this command set (`explicit`, else those `load_config`
    noted) and where and how fast it runs. A Config not made by `load_config`, with no `explicit`, is taken as it
    is: every key counts as set."""
    from .experiment import with_recorded_config

    explicit = getattr(cfg, _EXPLICIT_KEYS, None) if explicit is None else frozenset(explicit)
    return cfg if explicit is None else with_recorded_config(cfg, explicit, log=log)


def keep_outputs(cfg: Config, destination: str | Path = "runs", log=say) -> list[Path]:
    """Copy the experiment's results (every fold's files but last.pt; the report) to `destination`/<experiment>/:
    in a Kaggle notebook, from scratch space to the working directory that its output saves."""
    from .experiment import copy_outputs

    written = copy_outputs(cfg, destination)
    if written:
        log(f"kept {len(written)} files of `{cfg.name}` in {Path(destination) / cfg.name} (best.pt, metrics, OOF, "
            f"history and report of every fold; not last.pt or the image cache)")
    return written


def device_summary(cfg: Config, parallel: int | str = 1) -> str:
    """The card(s), the precision the kit will train in, and how many folds run at once: one line for a notebook.
    A card this torch has no kernels for (a P100 under Kaggle's torch) is refused with one line."""
    import torch

    from .device import autocast_dtype, card_name, precision_name, select_device
    from .parallel import resolve_parallel

    device = select_device(cfg.device)
    cards = (f"{card_name(device)} × {torch.cuda.device_count()}" if device.type == "cuda" else
             f"CPU ({os.cpu_count()} cores)")
    folds_at_once = resolve_parallel(parallel)
    return (f"device: {cards}; precision {precision_name(autocast_dtype(device, cfg.amp, cfg.amp_dtype))}; "
            f"{folds_at_once} fold(s) at a time")


def training_speed(cfg: Config) -> str:
    """Train images/s of every trained fold (mean over its epochs, from history.csv)."""
    import pandas as pd

    from .runs import HISTORY, fold_dir

    speeds = {fold: pd.read_csv(fold_dir(cfg, fold) / HISTORY)["images_per_s"].mean()
              for fold in range(cfg.folds.n_splits) if (fold_dir(cfg, fold) / HISTORY).is_file()}
    return "train images/s: " + (", ".join(f"fold {fold} {speed:,.0f}" for fold, speed in speeds.items())
                                 or "no fold trained yet")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

DEMO_DATA_DEFAULTS = {"easy": ("data/demo", 1500, 400), "hard": ("data/hard", 3000, 1000)}


def make_demo_data(out_dir: str | Path | None = None, n_train: int | None = None, n_test: int | None = None,
                   seed: int = 0, force: bool = False, difficulty: str = "easy", log=say) -> Path:
    """Generated data in the Kaggle layout (kit/demo_data.py): `easy` proves the pipeline runs; `hard` tells
    recipes apart (slides, stain, hard negatives, noisy labels; slides.csv and test_labels.csv beside)."""
    from .demo_data import DIFFICULTIES, demo_data_is_complete
    from .demo_data import make_demo_data as generate

    if difficulty not in DIFFICULTIES:
        raise KitError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    default_dir, default_train, default_test = DEMO_DATA_DEFAULTS[difficulty]
    out_dir, n_train, n_test = out_dir or default_dir, n_train or default_train, n_test or default_test
    if force or not Path(out_dir).is_dir():
        require_writable_dir(out_dir, "DATA_DIR")        # a file in the way or a read-only place: one line now
    if not force and demo_data_is_complete(out_dir, n_train, n_test, difficulty):
        log(f"{difficulty} demo data already in {out_dir} ({n_train} train / {n_test} test patches)")
        return Path(out_dir)
    generate(out_dir, n_train=n_train, n_test=n_test, seed=seed, difficulty=difficulty)
    log(f"{difficulty} demo data written to {out_dir}: {n_train} train / {n_test} test patches")
    return Path(out_dir)


def download_data(data_dir: str | Path = "data", log=say) -> Path:
    """Download, unzip and verify the competition files; a complete folder is left alone."""
    from .kaggle_api import download_competition_data

    return download_competition_data(Path(data_dir), log=log)


def build_cache(cfg: Config, log=say) -> None:
    from .data import cache_dir_for, check_data_dir, load_split_images, read_sample_submission, read_train_labels

    data_dir = check_data_dir(cfg.data_dir)
    require_writable_dir(cfg.out_dir)
    cache_dir = cache_dir_for(cfg, data_dir)
    for split, ids in (("train", read_train_labels(data_dir)["id"]), ("test", read_sample_submission(data_dir)["id"])):
        images = load_split_images(data_dir, split, ids, cache_dir)
        log(f"{split}: {len(images):,} images cached in {cache_dir}")


def bench(out_dir: str | Path = "runs/bench", log=say, **options) -> Path:
    """Images/s from files to the model on this machine (kit/bench.py): prints a table; returns the JSON's path."""
    from .bench import bench as run_bench

    return run_bench(out_dir, log=log, **options)


# ----------------------------------------------------------------------------------------------------------------
# Training and prediction
# ----------------------------------------------------------------------------------------------------------------

def train(cfg: Config, fold: int, force: bool = False, log=say) -> dict:
    """Train (or resume) one fold; a finished fold is skipped unless `force`."""
    from .fold import train_fold

    return train_fold(cfg, fold, force=force, log=log)


def train_all(cfg: Config, force: bool = False, parallel: int | str = 1, log=say) -> float:
    """Train (or resume) every fold: one after another, or `parallel` at a time (one process per GPU, or a share of
    the CPU cores; "auto" = the number of GPUs). Returns the CV AUC of the pooled out-of-fold predictions."""
    from .distributed import launched_rank, quiet
    from .experiment import finished_folds
    from .parallel import resolve_parallel, train_folds_parallel
    from .predict import oof_auc

    if launched_rank() != 0:        # under torchrun (NPROC): each fold on every rank, rank 0 alone speaks
        log = quiet
    if resolve_parallel(parallel) > 1:
        train_folds_parallel(cfg, parallel, force=force, log=log)
    else:
        train_folds_in_turn(cfg, force, log)
    found, _ = finished_folds(cfg)
    cv_auc = oof_auc(found)
    log(f"{cfg.name}: CV AUC {cv_auc:.4f} (pooled out-of-fold predictions with {cfg.tta.views} TTA, "
        f"{len(found)} folds)")
    return cv_auc


def train_folds_in_turn(cfg: Config, force: bool, log) -> None:
    """Every fold, one after another; a bar over the folds says how long the rest takes (`progress.FoldsBar`), and
    each fold's first steps what it and the folds after it will take (`progress.FoldClock`)."""
    import time

    from .distributed import launched_rank
    from .experiment import folds_to_train
    from .fold import train_fold
    from .progress import FoldsBar

    pending = folds_to_train(cfg, force)
    bar = FoldsBar(cfg.name, cfg.folds.n_splits, len(pending), hidden=launched_rank() != 0)
    try:
        for fold in range(cfg.folds.n_splits):
            started = time.perf_counter()
            train_fold(cfg, fold, force=force, log=log, folds_after=sum(f > fold for f in pending))
            if fold in pending:
                bar.fold_done(time.perf_counter() - started)
    finally:
        bar.close()


@contextmanager
def no_submission_when_interrupted():
    """Ctrl-C while predicting: say that no CSV was written (a cache build says what it kept itself)."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted("interrupted while predicting: no submission was written; trained folds and caches are "
                          "intact; rerun the same command") from None


def predict(cfg: Config, allow_missing_folds: bool = False, log=say, explicit=None) -> Path:
    """Fold ensemble × TTA on the test set → a validated CSV in submissions_dir; returns its path. The config is
    the folds' recorded one but for the keys this command set (`as_trained`)."""
    from .data import read_sample_submission
    from .predict import predict_test
    from .submission import build_submission, submission_path, write_submission

    cfg = as_trained(cfg, explicit, log)
    require_writable_dir(cfg.out_dir)
    require_writable_dir(cfg.submissions_dir, "submissions_dir")
    with no_submission_when_interrupted():
        prediction = predict_test(cfg, allow_missing_folds=allow_missing_folds, log=log)
    sample = read_sample_submission(cfg.data_dir)
    details = {"experiment": cfg.name, "cv_auc": prediction.cv_auc, "folds": [c.fold for c in prediction.folds],
               "tta": prediction.views,
               "sample_submission": str(Path(cfg.data_dir).resolve() / SAMPLE_SUBMISSION_CSV)}
    path = write_submission(build_submission(prediction.ids, prediction.probabilities, sample),
                            submission_path(cfg.submissions_dir, cfg.name), sample, details)
    log(f"submission validated against {SAMPLE_SUBMISSION_CSV} ({len(sample):,} rows)")
    return path


def report(configs: Config | list[Config], target_sensitivity: float = 0.95, saliency_images: int | None = None,
           log=say, explicit=None) -> Path:
    """runs/<experiment>/report.md with its figures; several configs → one side-by-side comparison.
    `saliency_images`: validation patches per fold behind the centre evidence share (None: 64; 0: no maps).
    Each config is its folds' recorded one but for the keys this command set (`as_trained`)."""
    from .report import write_comparison, write_report
    from .saliency import SALIENCY_IMAGES

    if not 0 < target_sensitivity < 1:
        raise KitError(f"target sensitivity must be between 0 and 1 (exclusive), got {target_sensitivity:g}; "
                       f"e.g. TARGET_SENSITIVITY=0.95")
    configs = [as_trained(cfg, explicit, log) for cfg in ([configs] if isinstance(configs, Config) else configs)]
    for cfg in configs:
        require_writable_dir(cfg.out_dir)
    saliency_images = SALIENCY_IMAGES if saliency_images is None else saliency_images
    if saliency_images < 0:
        raise KitError(f"--saliency-images must be 0 or more, got {saliency_images}; e.g. SALIENCY_IMAGES=64")
    if len(configs) > 1:
        return write_comparison(configs, target_sensitivity, saliency_images, log=log)
    return write_report(configs[0], target_sensitivity, saliency_images=saliency_images, log=log)


def predict_blend(configs: list[Config], method: str = "mean", allow_missing_folds: bool = False,
                  log=say, explicit=None) -> Path:
    """Several experiments' fold ensembles blended (weights chosen on OOF) → a validated CSV; returns its path.
    Each config is its folds' recorded one but for the keys this command set (`as_trained`)."""
    from .data import read_sample_submission
    from .predict import predict_blend as blend_experiments
    from .submission import build_submission, submission_path, write_submission

    configs = [as_trained(cfg, explicit, log) for cfg in configs]
    first = configs[0]
    for cfg in configs:
        require_writable_dir(cfg.out_dir)
    require_writable_dir(first.submissions_dir, "submissions_dir")
    with no_submission_when_interrupted():
        blended = blend_experiments(configs, method, allow_missing_folds=allow_missing_folds, log=log)
    sample = read_sample_submission(first.data_dir)
    name = "blend-" + "+".join(blended.members)
    details = {"experiment": name, "cv_auc": blended.cv_auc, "folds": "each member's", "tta": first.tta.views,
               "blend": {"method": blended.method, "members": blended.members,
                         "weights": [round(float(w), 4) for w in blended.weights],
                         "member_cv_auc": blended.member_cv_auc},
               "sample_submission": str(Path(first.data_dir).resolve() / SAMPLE_SUBMISSION_CSV)}
    path = write_submission(build_submission(blended.ids, blended.probabilities, sample),
                            submission_path(first.submissions_dir, name), sample, details)
    log(f"submission validated against {SAMPLE_SUBMISSION_CSV} ({len(sample):,} rows)")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Kaggle
# ----------------------------------------------------------------------------------------------------------------

def read_submission_details(path: str | Path) -> dict:
    """What `predict` recorded beside a CSV (experiment, CV AUC, folds, TTA, its sample_submission.csv)."""
    from .submission import read_submission_details as read

    return read(path)


def submit(path: str | Path, message: str | None = None, dry_run: bool = False, data_dir: str | Path | None = None,
           force: bool = False, upload_anyway: str = "pass FORCE=1 (or DRY_RUN=1 to only validate)",
           log=say) -> None:
    """Validate `path` against sample_submission.csv, then upload it (unless `dry_run`).

    sample_submission.csv comes from `data_dir`, else from the folder the file was predicted from. Rows that are
    not the competition's 57,458 test ids (a prediction of the demo data) are uploaded only with `force`.
    """
    from .data import read_sample_submission
    from .kaggle_api import submit as upload
    from .submission import default_message, read_submission_details

    if not path or not str(path).strip():
        raise KitError("say which file to submit: make submit FILE=submissions/<experiment>-<time>.csv")
    if not Path(path).is_file():
        raise KitError(f"submission file not found: {path} (make predict writes one under submissions/)")
    details = read_submission_details(path)
    sample_source = data_dir or details.get("sample_submission") or competition_input()
    if sample_source is None:
        raise KitError(f"cannot tell which {SAMPLE_SUBMISSION_CSV} {path} answers: pass DATA_DIR=/path/to/data")
    upload(path, read_sample_submission(sample_source), message or default_message(details, path),
           dry_run=dry_run, force=force, upload_anyway=upload_anyway, log=log)


def list_submissions(log=say):
    """The competition's recent submissions (newest first) with status and public score, as a DataFrame."""
    from .kaggle_api import recent_submissions

    table = recent_submissions()
    log(table.to_string(index=False) if len(table) else f"no submissions yet to {COMPETITION}")
    return table
