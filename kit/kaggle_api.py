"""Every call of the `kaggle` client: credentials, submitting and listing submissions, downloading the competition
data (`make data`), and the dataset and kernel calls `make kaggle-run` (kit/kaggle_run.py) orchestrates.

The client is imported lazily (`import kaggle` authenticates at import), and only after the credentials it reads are
found to be present: without them nothing is sent and the message says where to put them. Every error the client
raises (HTTP, connection, its own) comes out as one line that says what to do (`explain_api_error`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from .competition import COMPETITION, KAGGLE_CREDENTIAL_FILES, TEST_DIR, TRAIN_DIR
from .data import (
    bad_images_error,
    check_data_dir,
    find_bad_images,
    image_paths,
    read_sample_submission,
    read_train_labels,
)
from .errors import KitError
from .io import atomic_path
from .progress import progress_bar, say
from .submission import foreign_rows, validate_submission_file

CREDENTIALS_HINT = ("no Kaggle credentials found: download kaggle.json from https://www.kaggle.com/settings "
                    "(API → Create New Token) into ~/.kaggle/kaggle.json (chmod 600), or set KAGGLE_USERNAME and "
                    "KAGGLE_KEY (or KAGGLE_API_TOKEN); nothing was sent")
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"


# ----------------------------------------------------------------------------------------------------------------
# Credentials, the client, its errors
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


def kaggle_username(api) -> str:
    """The user the credentials name (kaggle.json's `username`, or KAGGLE_USERNAME); "" when they name none."""
    return api.get_config_value("username") or ""


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


# ----------------------------------------------------------------------------------------------------------------
# Submissions
# ----------------------------------------------------------------------------------------------------------------

def submit(path: str | Path, sample: pd.DataFrame, message: str, competition: str = COMPETITION,
           dry_run: bool = False, force: bool = False, upload_anyway: str = "pass FORCE=1", log=say) -> None:
    """Validate the file (kit/submission.py), then upload it (unless `dry_run`). Rows that are not the competition's
    test ids are refused unless `force`: such a file can only fail on Kaggle. `upload_anyway`: how the command the
    user ran uploads it anyway (a flag that means that in that command)."""
    validate_submission_file(path, sample)
    log(f"{path}: valid ({len(sample):,} rows, ids match sample_submission.csv)")
    foreign = foreign_rows(sample)
    if dry_run:
        log("dry run: nothing sent" + (f" (to upload it, {upload_anyway}: the file has {foreign})" if foreign else ""))
        return
    if foreign and not force:
        raise KitError(f"{path} has {foreign}: it looks like a prediction of other data (e.g. the demo), which "
                       f"Kaggle can only reject; nothing was sent. To upload it anyway, {upload_anyway}")
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
# Downloading the competition data (`make data`)
# ----------------------------------------------------------------------------------------------------------------

def find_data_problems(data_dir: Path) -> tuple[int, int, list[tuple[Path, str]]]:
    """(train count, test count, bad images): every image both CSVs list, decoded in parallel; missing files and
    files that do not decode as 96×96×3 uint8 come back with what is wrong. A missing CSV or folder raises."""
    check_data_dir(data_dir)
    train_ids = read_train_labels(data_dir)["id"]
    test_ids = read_sample_submission(data_dir)["id"]
    paths = image_paths(data_dir / TRAIN_DIR, train_ids) + image_paths(data_dir / TEST_DIR, test_ids)
    return len(train_ids), len(test_ids), find_bad_images(paths, desc="verify images")


def extract_missing(zip_path: Path, data_dir: Path, bad: set[Path] = frozenset(), log=say) -> int:
    """Unzip the members that are absent, of the wrong size (so an interrupted unzip resumes) or in `bad` (files
    that do not decode), each atomically."""
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
        for member, target in progress_bar(todo, desc="unzip", unit="file", hidden=not todo):
            with archive.open(member) as source, atomic_path(target) as tmp, open(tmp, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
            extracted += 1
    log(f"unzipped {extracted:,} of {len(members):,} files into {data_dir}")
    return extracted


def download_competition_data(data_dir: Path, competition: str = COMPETITION, log=say) -> Path:
    """Verify that every image decodes; download (resuming where the client can) and unzip what is missing or bad;
    verify again. A complete folder is left alone; files the zip cannot repair are named."""
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
    brought = zip_path.is_file()          # downloaded in a browser (or by an earlier run): no credentials needed
    if brought:
        log(f"{zip_path} is here: unzipping and verifying it (nothing to download)")
    else:
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
    if brought:
        log(f"{data_dir} verified: {train_count:,} train / {test_count:,} test images, every one decodes "
            f"({zip_path.name} kept: it was here before this run; delete it to free its space)")
    else:
        zip_path.unlink()
        log(f"{data_dir} verified: {train_count:,} train / {test_count:,} test images, every one decodes "
            f"({zip_path.name} removed)")
    return data_dir


# ----------------------------------------------------------------------------------------------------------------
# Datasets and kernels (`make kaggle-run`)
# ----------------------------------------------------------------------------------------------------------------

def dataset_exists(api, ref: str) -> bool:
    """Whether the dataset `ref` (owner/slug) exists; errors other than its absence (404) are raised as they are."""
    try:
        api.dataset_status(ref)
        return True
    except Exception as err:
        if getattr(getattr(err, "response", None), "status_code", None) == 404:
            return False
        raise


def upload_dataset(api, folder: Path, ref: str, notes: str, what: str) -> bool:
    """`folder` (its files and dataset-metadata.json) as the private dataset `ref`: a new version with `notes` when
    it exists, else created. Returns whether it was versioned. `what` names the files in messages."""
    try:
        versioned = dataset_exists(api, ref)
        if versioned:
            response = api.dataset_create_version(str(folder), notes, quiet=True, dir_mode="zip")
        else:
            response = api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip")
    except Exception as err:
        raise explain_api_error(err, f"upload {what} as the dataset {ref}") from None
    error = getattr(response, "error", "")
    if error:
        raise KitError(f"Kaggle did not accept {what} as {ref}: {error}")
    return versioned


def dataset_status(api, ref: str) -> str:
    """The dataset's processing status as a lower-case word: "ready", "pending", "blobs_received", "failed", …"""
    try:
        return str(api.dataset_status(ref)).lower()
    except Exception as err:
        raise explain_api_error(err, f"read the status of the dataset {ref}") from None


def upload_kernel(api, folder: Path, kernel: str, accelerator: str) -> dict:
    """`folder` (a notebook and its kernel-metadata.json naming `kernel`, owner/slug) pushed as a new version of
    the kernel on `accelerator`; returns {"kernel": owner/slug, "version", "url"} as Kaggle answered."""
    try:
        response = api.kernels_push(str(folder), acc=accelerator)
    except Exception as err:
        raise explain_api_error(err, f"push the kernel {kernel}") from None
    error = getattr(response, "error", "")
    if error:
        raise KitError(f"Kaggle did not accept the kernel {kernel}: {error}")
    ref = getattr(response, "ref", "") or kernel
    if ref.startswith("/code/"):          # the API answers with the kernel's URL path
        ref = ref[len("/code/"):]
    return {"kernel": ref, "version": getattr(response, "version_number", None), "url": getattr(response, "url", "")}


def kernel_status(api, kernel: str) -> tuple[str, str]:
    """(status, failure message) of the kernel's latest run: the status (the client's KernelWorkerStatus) as a
    lower-case word, "queued", "running", "complete", "error", "cancel_requested", …; the message "" when none."""
    try:
        response = api.kernels_status(kernel)
    except Exception as err:
        raise explain_api_error(err, f"read the status of {kernel}") from None
    status = getattr(response, "status", response)
    return str(getattr(status, "name", status)).lower(), getattr(response, "failure_message", "") or ""


def download_kernel_output(api, kernel: str, folder: Path) -> Path:
    """Every output file of the kernel's latest run (and its log) into `folder`."""
    try:
        api.kernels_output(kernel, str(folder), force=True, quiet=True)
    except Exception as err:
        raise explain_api_error(err, f"download the outputs of {kernel}") from None
    return folder


def kernel_log_tail(api, kernel: str, lines: int) -> list[str]:
    """The last `lines` non-empty lines of the kernel's log (Kaggle's log is a JSON list of {stream_name, time,
    data}); [] when it cannot be had: this only decorates a failure already being reported."""
    with tempfile.TemporaryDirectory(prefix="kit-kaggle-log-") as tmp:
        try:
            api.kernels_output(kernel, tmp, force=True, quiet=True)
        except Exception:
            return []
        logs = sorted(Path(tmp).glob("*.log"))
        if not logs:
            return []
        text = logs[0].read_text(errors="replace")
        try:
            text = "".join(entry.get("data", "") for entry in json.loads(text))
        except (ValueError, AttributeError, TypeError):
            pass
        return [line.strip() for line in text.splitlines() if line.strip()][-lines:]
