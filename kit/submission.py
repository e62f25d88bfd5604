"""sample_submission-format CSVs: building, validating, writing, and uploading through the Kaggle API.

A submission is refused before anything leaves the machine when its header, row count or ids differ from
sample_submission.csv, or a label is missing, non-numeric or outside [0, 1]; the message names the first bad row.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .competition import COMPETITION
from .errors import KitError
from .io import atomic_write_csv, atomic_write_json

CREDENTIALS_HINT = ("no Kaggle credentials found: download kaggle.json from https://www.kaggle.com/settings "
                    "(API → Create New Token) into ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and "
                    "KAGGLE_KEY (or KAGGLE_API_TOKEN); nothing was sent")
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame, name: str = "submission") -> None:
    """Raise KitError naming the first problem: header, count, duplicate/unknown/missing ids, bad labels."""
    if list(submission.columns) != ["id", "label"]:
        raise KitError(f"{name}: header must be `id,label` (as in sample_submission.csv), "
                       f"found `{','.join(map(str, submission.columns))}`")
    ids = submission["id"].astype(str)
    duplicated = ids.duplicated()
    if duplicated.any():
        raise KitError(f"{name}: row {_line(duplicated)} repeats id {ids[duplicated].iloc[0]}")
    unknown = ~ids.isin(set(sample["id"]))
    if unknown.any():
        raise KitError(f"{name}: row {_line(unknown)} has id {ids[unknown].iloc[0]}, "
                       f"which is not in sample_submission.csv")
    if len(submission) != len(sample):
        missing = sample["id"][~sample["id"].isin(set(ids))]
        raise KitError(f"{name}: {len(submission):,} rows but sample_submission.csv has {len(sample):,}; "
                       f"missing ids include {missing.iloc[0]} (sample_submission.csv row {missing.index[0] + 2})")
    labels = pd.to_numeric(submission["label"], errors="coerce")
    not_numeric = labels.isna()
    if not_numeric.any():
        raise KitError(f"{name}: row {_line(not_numeric)} (id {ids[not_numeric].iloc[0]}) has label "
                       f"{submission['label'][not_numeric].iloc[0]}; every label must be a number in [0, 1]")
    outside = (labels < 0) | (labels > 1) | ~np.isfinite(labels)
    if outside.any():
        raise KitError(f"{name}: row {_line(outside)} (id {ids[outside].iloc[0]}) has label "
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


def _line(mask: pd.Series) -> int:
    """1-based line number in the CSV of the first True (line 1 is the header)."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def build_submission(ids, probabilities, sample: pd.DataFrame) -> pd.DataFrame:
    """Predictions (any order) → sample_submission's ids in sample_submission's order, validated."""
    predictions = pd.DataFrame({"id": pd.Series(ids, dtype=str), "label": np.asarray(probabilities, dtype=float)})
    validate_submission(predictions, sample, name="predictions")
    return sample[["id"]].merge(predictions, on="id", how="left", validate="one_to_one")


def submission_path(submissions_dir: str | Path, experiment: str, now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path(submissions_dir) / f"{experiment}-{stamp}.csv"


def write_submission(submission: pd.DataFrame, path: str | Path, sample: pd.DataFrame, details: dict) -> Path:
    """Write the CSV atomically, re-read and validate it, and write `<name>.json` beside it with `details`
    (experiment, CV AUC, folds, TTA, sample_submission path) for `make submit`'s message."""
    path = Path(path)
    atomic_write_csv(path, submission)
    validate_submission_file(path, sample)
    atomic_write_json(path.with_suffix(".json"), details)
    return path


def read_submission_details(path: str | Path) -> dict:
    details_path = Path(path).with_suffix(".json")
    return json.loads(details_path.read_text()) if details_path.exists() else {}


def default_message(details: dict, path: str | Path) -> str:
    if not details:
        return f"{Path(path).stem} (kit submission)"
    return (f"{details['experiment']} | CV AUC {details['cv_auc']:.4f} | folds {details['folds']} | "
            f"TTA {details['tta']}")


# ----------------------------------------------------------------------------------------------------------------
# The Kaggle API
# ----------------------------------------------------------------------------------------------------------------

def kaggle_config_dirs() -> list[Path]:
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path.home() / ".kaggle", xdg / "kaggle"]


def has_kaggle_credentials() -> bool:
    """Whether any of the kaggle client's credential sources is present (checked before importing it)."""
    if os.environ.get("KAGGLE_API_TOKEN") or os.environ.get("KAGGLE_API_V1_TOKEN"):
        return True
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    names = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
    return any((directory / name).is_file() for directory in kaggle_config_dirs() for name in names)


def kaggle_api():
    """The authenticated kaggle client. Imported here, not at the top: `import kaggle` authenticates."""
    if not has_kaggle_credentials():
        raise KitError(CREDENTIALS_HINT)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
    except SystemExit:      # the client exits when the credentials it found do not authenticate
        raise KitError(CREDENTIALS_HINT.replace("no Kaggle credentials found", "Kaggle credentials not accepted")) \
            from None
    return api


def explain_api_error(err: Exception, action: str) -> KitError:
    """Turn the client's HTTP and connection errors into one line that says what to do."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    if status == 403:
        return KitError(f"Kaggle refused to {action} (HTTP 403): accept the competition rules at {RULES_URL}, "
                        f"then retry")
    if status == 401:
        return KitError(f"Kaggle refused to {action} (HTTP 401): the credentials are not valid; "
                        f"create a new token at https://www.kaggle.com/settings")
    if status is not None:
        return KitError(f"Kaggle could not {action} (HTTP {status}); retry later")
    return KitError(f"could not reach Kaggle to {action} ({type(err).__name__}); check the network and retry")


def submit(path: str | Path, sample: pd.DataFrame, message: str, competition: str = COMPETITION,
           dry_run: bool = False, log=print) -> None:
    """Validate the file, then upload it (unless `dry_run`)."""
    validate_submission_file(path, sample)
    log(f"{path}: valid ({len(sample):,} rows, ids match sample_submission.csv)")
    if dry_run:
        log("dry run: nothing sent")
        return
    api = kaggle_api()
    try:
        response = api.competition_submit(str(path), message, competition, quiet=True)
    except Exception as err:  # requests' HTTPError / ConnectionError and the client's own
        raise explain_api_error(err, f"accept the submission for {competition}") from None
    result = getattr(response, "message", "") or ""
    if result == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KitError(f"Kaggle upload of {path} failed ({result}); retry `make submit`")
    log(f"submitted {path} to {competition}: {message!r}" + (f" ({result})" if result else ""))
