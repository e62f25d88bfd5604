"""The sample_submission CSV format: building, validating, writing and reading submissions and their details.

A submission is refused before anything leaves the machine when its header, row count or ids differ from
sample_submission.csv, or a label is missing, non-numeric or outside [0, 1]; the message names the first bad row.
Rows that are not the competition's 57,458 test ids (a prediction of the demo data) are named by `foreign_rows`:
the upload (kit/kaggle_api.py) needs FORCE=1 for them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .competition import ID_LENGTH, TEST_IMAGES
from .data import check_ids_unpadded, first_line_of
from .errors import KitError
from .io import atomic_write_csv, atomic_write_json, path_inside, timestamp

# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame, name: str = "submission") -> None:
    """Raise KitError naming the first problem: header, count, duplicate/unknown/missing ids, bad labels."""
    if list(submission.columns) != ["id", "label"]:
        raise KitError(f"{name}: header must be `id,label` (as in sample_submission.csv), "
                       f"found `{','.join(map(str, submission.columns))}`")
    ids = submission["id"].astype(str)
    check_ids_unpadded(ids, name)
    duplicated = ids.duplicated()
    if duplicated.any():
        raise KitError(f"{name}: row {first_line_of(duplicated)} repeats id {ids[duplicated].iloc[0]}")
    unknown = ~ids.isin(set(sample["id"]))
    if unknown.any():
        raise KitError(f"{name}: row {first_line_of(unknown)} has id {ids[unknown].iloc[0]}, "
                       f"which is not in sample_submission.csv")
    if len(submission) != len(sample):
        missing = sample["id"][~sample["id"].isin(set(ids))]
        raise KitError(f"{name}: {len(submission):,} rows but sample_submission.csv has {len(sample):,}; "
                       f"missing ids include {missing.iloc[0]} (sample_submission.csv row {missing.index[0] + 2})")
    labels = pd.to_numeric(submission["label"], errors="coerce")
    not_numeric = labels.isna()
    if not_numeric.any():
        raise KitError(f"{name}: row {first_line_of(not_numeric)} (id {ids[not_numeric].iloc[0]}) has label "
                       f"{submission['label'][not_numeric].iloc[0]}; every label must be a number in [0, 1]")
    outside = (labels < 0) | (labels > 1) | ~np.isfinite(labels)
    if outside.any():
        raise KitError(f"{name}: row {first_line_of(outside)} (id {ids[outside].iloc[0]}) has label "
                       f"{labels[outside].iloc[0]}; every label must be a probability in [0, 1]")


def read_submission_file(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise KitError(f"submission file not found: {path} (make predict writes one under submissions/)")
    try:
        return pd.read_csv(path, dtype={"id": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise KitError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None


def validate_submission_file(path: str | Path, sample: pd.DataFrame) -> pd.DataFrame:
    submission = read_submission_file(path)
    validate_submission(submission, sample, name=str(path))
    return submission


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def build_submission(ids, probabilities, sample: pd.DataFrame) -> pd.DataFrame:
    """Predictions (any order) → sample_submission's ids in sample_submission's order, validated."""
    predictions = pd.DataFrame({"id": pd.Series(ids, dtype=str), "label": np.asarray(probabilities, dtype=float)})
    validate_submission(predictions, sample, name="predictions")
    return sample[["id"]].merge(predictions, on="id", how="left", validate="one_to_one")


def submission_path(submissions_dir: str | Path, experiment: str, now: datetime | None = None) -> Path:
    """submissions/<experiment>-<time>.csv, refused unless it is inside `submissions_dir`."""
    return path_inside(submissions_dir, f"{experiment}-{timestamp(now)}.csv")


def write_submission(submission: pd.DataFrame, path: str | Path, sample: pd.DataFrame, details: dict) -> Path:
    """Write the CSV atomically, re-read and validate it, and write `<name>.json` beside it with `details`
    (experiment, CV AUC, folds, TTA, sample_submission path) for `make submit`'s message."""
    path = Path(path)
    atomic_write_csv(path, submission)
    validate_submission_file(path, sample)
    atomic_write_json(path.with_suffix(".json"), details)
    return path


def read_submission_details(path: str | Path) -> dict:
    """The `<name>.json` beside a CSV, {} when there is none; a damaged one is named in one line."""
    details_path = Path(path).with_suffix(".json")
    if not details_path.exists():
        return {}
    try:
        details = json.loads(details_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise KitError(f"{details_path} is not readable JSON: delete it (the CSV is still submittable; pass "
                       f"DATA_DIR= so it is checked against that sample_submission.csv)") from None
    if not isinstance(details, dict):
        raise KitError(f"{details_path} should hold a JSON object; delete it and pass DATA_DIR= to submit the CSV")
    return details


def default_message(details: dict, path: str | Path) -> str:
    """"experiment | CV AUC … | folds … | TTA …" from whatever the details hold (a notebook a user edited may have
    written only some of it); the file's name when they say nothing."""
    experiment = details.get("experiment") or Path(path).stem
    parts = [str(experiment)]
    if isinstance(details.get("cv_auc"), (int, float)):
        parts.append(f"CV AUC {details['cv_auc']:.4f}")
    for key, label in (("folds", "folds"), ("tta", "TTA")):
        if details.get(key) not in (None, ""):
            parts.append(f"{label} {details[key]}")
    return " | ".join(parts) if len(parts) > 1 else f"{experiment} (kit submission)"


# ----------------------------------------------------------------------------------------------------------------
# Whether Kaggle can score it
# ----------------------------------------------------------------------------------------------------------------

def foreign_rows(sample: pd.DataFrame) -> str | None:
    """Why rows answering `sample` cannot be a submission to the competition (None when they can be): Kaggle scores
    exactly its 57,458 test ids, each 40 hexadecimal digits."""
    if len(sample) != TEST_IMAGES:
        return f"{len(sample):,} rows, not the competition's {TEST_IMAGES:,} test ids"
    malformed = ~sample["id"].astype(str).str.fullmatch(f"[0-9a-f]{{{ID_LENGTH}}}")
    if malformed.any():
        return (f"ids such as {sample['id'][malformed].iloc[0]!r}, not the competition's ({ID_LENGTH} hexadecimal "
                f"digits)")
    return None
