"""sample_submission-format CSVs: building, validating, writing, and uploading through the Kaggle API.

A submission is refused before anything leaves the machine when its header, row count or ids differ from
sample_submission.csv, or a label is missing, non-numeric or outside [0, 1]; the message names the first bad row.
An upload whose rows are not the competition's 57,458 test ids (a prediction of the demo data) needs FORCE=1.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .competition import COMPETITION, ID_LENGTH, KAGGLE_CREDENTIAL_FILES, TEST_IMAGES
from .data import check_ids_unpadded, first_line_of
from .errors import KitError
from .io import atomic_write_csv, atomic_write_json, path_inside

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
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return path_inside(submissions_dir, f"{experiment}-{stamp}.csv")


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
    return any((directory / name).is_file() for directory in kaggle_config_dirs() for name in KAGGLE_CREDENTIAL_FILES)


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
    if isinstance(err, ValueError) and "denied" in str(err):    # the client's own words for a 401/403 on kernels
        return KitError(f"Kaggle refused to {action}: {str(err).splitlines()[0]}")
    return KitError(f"could not reach Kaggle to {action} ({type(err).__name__}); check the network and retry")


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


def submit(path: str | Path, sample: pd.DataFrame, message: str, competition: str = COMPETITION,
           dry_run: bool = False, force: bool = False, log=print) -> None:
    """Validate the file, then upload it (unless `dry_run`). Rows that are not the competition's test ids are
    refused unless `force`: such a file can only fail on Kaggle."""
    validate_submission_file(path, sample)
    log(f"{path}: valid ({len(sample):,} rows, ids match sample_submission.csv)")
    foreign = foreign_rows(sample)
    if dry_run:
        log("dry run: nothing sent" + (f" (an upload would need FORCE=1: the file has {foreign})" if foreign else ""))
        return
    if foreign and not force:
        raise KitError(f"{path} has {foreign}: it looks like a prediction of other data (e.g. the demo), which "
                       f"Kaggle can only reject; nothing was sent. Pass FORCE=1 to upload it anyway, or DRY_RUN=1 to "
                       f"only validate")
    api = kaggle_api()
    try:
        response = api.competition_submit(str(path), message, competition, quiet=True)
    except Exception as err:  # requests' HTTPError / ConnectionError and the client's own
        raise explain_api_error(err, f"accept the submission for {competition}") from None
    result = getattr(response, "message", "") or ""
    if result == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KitError(f"Kaggle upload of {path} failed ({result}); retry `make submit`")
    log(f"submitted {path} to {competition}: {message!r}" + (f" ({result})" if result else ""))


def recent_submissions(competition: str = COMPETITION, limit: int = 20) -> pd.DataFrame:
    """Date, description, status and public score of the latest submissions, newest first."""
    api = kaggle_api()
    try:
        submissions = api.competition_submissions(competition, page_size=limit) or []
    except Exception as err:
        raise explain_api_error(err, f"list the submissions of {competition}") from None
    rows = [{"date": s.date, "file": s.file_name, "description": s.description,
             "status": getattr(s.status, "name", s.status), "public_score": s.public_score,
             "private_score": s.private_score} for s in submissions if s is not None]
    return pd.DataFrame(rows, columns=["date", "file", "description", "status", "public_score", "private_score"])


# ----------------------------------------------------------------------------------------------------------------
# Downloading the competition data
# ----------------------------------------------------------------------------------------------------------------

def find_data_problems(data_dir: Path) -> tuple[int, int, list[tuple[Path, str]]]:
    """(train count, test count, bad images): every image both CSVs list, decoded in parallel; missing files and
    files that do not decode as 96×96×3 uint8 come back with what is wrong. A missing CSV or folder raises."""
    from .competition import TEST_DIR, TRAIN_DIR
    from .data import check_data_dir, find_bad_images, image_paths, read_sample_submission, read_train_labels

    check_data_dir(data_dir)
    train_ids = read_train_labels(data_dir)["id"]
    test_ids = read_sample_submission(data_dir)["id"]
    paths = image_paths(data_dir / TRAIN_DIR, train_ids) + image_paths(data_dir / TEST_DIR, test_ids)
    return len(train_ids), len(test_ids), find_bad_images(paths, desc="verify images")


def extract_missing(zip_path: Path, data_dir: Path, bad: set[Path] = frozenset(), log=print) -> int:
    """Unzip the members that are absent, of the wrong size (so an interrupted unzip resumes) or in `bad` (files
    that do not decode), each atomically."""
    import shutil
    import zipfile

    from .io import atomic_path

    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        zip_path.unlink()
        raise KitError(f"{zip_path} is not a complete zip and was removed; run `make data` again") from None
    bad = {path.resolve() for path in bad}
    extracted = 0
    with archive:
        root = data_dir.resolve()
        members = [m for m in archive.infolist() if not m.is_dir()]
        todo = []
        for member in members:
            target = (data_dir / member.filename).resolve()
            if root not in target.parents:
                raise KitError(f"{zip_path}: member {member.filename} would land outside {data_dir}; not extracting")
            if not target.is_file() or target.stat().st_size != member.file_size or target in bad:
                todo.append((member, target))
        from .progress import progress_bar

        for member, target in progress_bar(todo, desc="unzip", unit="file", hidden=not todo):
            with archive.open(member) as source, atomic_path(target) as tmp, open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
            extracted += 1
    log(f"unzipped {extracted:,} of {len(members):,} files into {data_dir}")
    return extracted


def download_competition_data(data_dir: Path, competition: str = COMPETITION, log=print) -> Path:
    """Verify that every image decodes; download (resuming where the client can) and unzip what is missing or bad;
    verify again. A complete folder is left alone; files the zip cannot repair are named."""
    from .data import bad_images_error

    bad: list[tuple[Path, str]] = []
    try:
        train_count, test_count, bad = find_data_problems(data_dir)
        if not bad:
            log(f"{data_dir} is complete: {train_count:,} train / {test_count:,} test images, every one decodes as "
                f"a 96×96×3 patch; nothing to download")
            return data_dir
        log(str(bad_images_error(bad, train_count + test_count, "re-extracting them from the competition zip")))
    except KitError:
        pass                    # no CSVs or image folders yet: everything comes from the zip
    zip_path = data_dir / f"{competition}.zip"
    data_dir.mkdir(parents=True, exist_ok=True)
    api = kaggle_api()
    log(f"downloading {competition} into {data_dir} (the client resumes a partial download)")
    try:
        api.competition_download_files(competition, path=str(data_dir), quiet=False)
    except Exception as err:
        raise explain_api_error(err, f"download the {competition} data") from None
    if not zip_path.is_file():
        raise KitError(f"the download did not produce {zip_path}; run `make data` again")
    extract_missing(zip_path, data_dir, {path for path, _ in bad}, log=log)
    train_count, test_count, bad = find_data_problems(data_dir)
    if bad:
        raise bad_images_error(bad, train_count + test_count,
                               f"{zip_path} holds them this way too (it is kept): delete it and run `make data` "
                               f"again for a fresh download, or replace those files by hand")
    zip_path.unlink()
    log(f"{data_dir} verified: {train_count:,} train / {test_count:,} test images, every one decodes "
        f"({zip_path.name} removed)")
    return data_dir
