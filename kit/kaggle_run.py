"""`make kaggle-run`: train and predict on Kaggle's free GPUs from a laptop, with the real `kaggle` client.

1. the kit bundle (kit/bundle.py) as a private dataset `<user>/hcd-kit`: created the first time, versioned after;
2. notebooks/kaggle.ipynb as a private kernel `<user>/hcd-kit-<experiment>`, the competition and the kit attached,
   GPU on (ACCELERATOR), internet off, the effective config injected into its parameters cell;
3. its status followed with one progress line; on failure, one line with the end of its log;
4. its outputs downloaded: submission.csv into submissions/<experiment>-kaggle-<time>.csv, each fold's results into
   runs/<experiment>/ (what the notebook keeps: best.pt, metrics, OOF, history; not the cache);
5. with SUBMIT=1, that CSV submitted as `make submit` does.

What was pushed is recorded in runs/<experiment>/kaggle-run.json: run again after an interruption and it follows the
same kernel version instead of pushing a new one (FORCE=1 pushes anew).
"""

from __future__ import annotations

import json
import pprint
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from .bundle import REPO, write_bundle
from .competition import COMPETITION, SAMPLE_SUBMISSION_CSV
from .config import Config
from .errors import KitError
from .io import atomic_write_json, atomic_write_text
from .runs import experiment_dir, flat_config

DATASET_SLUG = "hcd-kit"
NOTEBOOK = REPO / "notebooks" / "kaggle.ipynb"
PATH_KEYS = frozenset({"data_dir", "out_dir", "cache_dir", "submissions_dir"})   # Kaggle's paths are its own
DEFAULT_ACCELERATOR = "NvidiaTeslaT4"
REFUSED_ACCELERATORS = ("p100",)     # Kaggle's torch has no kernels for it (kit/device.py)
POLL_SECONDS = 30.0
LOG_TAIL = 5
DONE, FAILED = "complete", ("error", "cancel_requested", "cancel_acknowledged")


def state_path(cfg: Config) -> Path:
    return experiment_dir(cfg) / "kaggle-run.json"


def status_name(response) -> str:
    """The kernel status (the client's KernelWorkerStatus) as a lower-case word: "queued", "running", "complete",
    "error", "cancel_requested", …"""
    status = getattr(response, "status", response)
    return str(getattr(status, "name", status)).lower()


def notebook_with_parameters(cfg: Config, folds, submit: bool = False) -> dict:
    """notebooks/kaggle.ipynb with its parameters cell set to `cfg` (every key but the paths, which are Kaggle's)."""
    notebook = json.loads(NOTEBOOK.read_text())
    overrides = dict(flat_config(cfg, neutral=PATH_KEYS), name=cfg.name)
    lines = ["# Parameters (written by `make kaggle-run`)\n",
             'CONFIG = "baseline_bn"  # every key below overrides it: the effective config of the run\n',
             f"OVERRIDES = {pprint.pformat(overrides, width=110, sort_dicts=False)}\n",
             f"FOLDS = {folds!r}\n", 'PARALLEL = "auto"\n', f"SUBMIT = {submit!r}\n"]
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    cells[0]["source"] = lines
    return notebook


def kernel_metadata(user: str, cfg: Config, accelerator: str) -> dict:
    return {"id": f"{user}/{DATASET_SLUG}-{slug(cfg.name)}", "title": f"{DATASET_SLUG}-{slug(cfg.name)}",
            "code_file": NOTEBOOK.name, "language": "python", "kernel_type": "notebook", "is_private": True,
            "enable_gpu": True, "enable_tpu": False, "enable_internet": False,
            "dataset_sources": [f"{user}/{DATASET_SLUG}"], "competition_sources": [COMPETITION],
            "kernel_sources": [], "model_sources": [], "machine_shape": accelerator}


def slug(text: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return "-".join(part for part in cleaned.split("-") if part) or "run"


def check_accelerator(accelerator: str) -> str:
    if any(word in accelerator.lower() for word in REFUSED_ACCELERATORS):
        raise KitError(f"ACCELERATOR={accelerator}: Kaggle's torch has no kernels for the P100; pick a T4 "
                       f"(NvidiaTeslaT4, the default) or an L4 (NvidiaL4)")
    return accelerator


def push_dataset(api, user: str, work: Path, log) -> str:
    """The kit bundle as the private dataset <user>/hcd-kit: a new version when it exists, else created."""
    from .submission import explain_api_error

    folder = work / "dataset"
    folder.mkdir()
    write_bundle(folder / f"{DATASET_SLUG}.zip")
    ref = f"{user}/{DATASET_SLUG}"
    atomic_write_json(folder / "dataset-metadata.json", {"title": DATASET_SLUG, "id": ref,
                                                          "licenses": [{"name": "CC0-1.0"}]})
    try:
        exists = dataset_exists(api, ref)
        if exists:
            response = api.dataset_create_version(str(folder), f"kit bundle {datetime.now():%Y-%m-%d %H:%M}",
                                                  quiet=True, dir_mode="zip")
        else:
            response = api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip")
    except Exception as err:
        raise explain_api_error(err, f"upload the kit bundle as the dataset {ref}") from None
    error = getattr(response, "error", "")
    if error:
        raise KitError(f"Kaggle did not accept the kit bundle as {ref}: {error}")
    log(f"kit bundle {'versioned' if exists else 'created'} as the private dataset {ref}")
    return ref


def wait_until_ready(api, ref: str, poll_seconds: float, log, limit_seconds: float = 1800) -> None:
    """Kaggle processes a new dataset version before notebooks see it: a kernel pushed earlier would attach the old
    bundle."""
    from .submission import explain_api_error

    started = time.monotonic()
    while True:
        try:
            status = str(api.dataset_status(ref)).lower()
        except Exception as err:
            raise explain_api_error(err, f"read the status of the dataset {ref}") from None
        if status == "ready":
            return
        if status in ("failed", "deleted") or time.monotonic() - started > limit_seconds:
            raise KitError(f"Kaggle did not finish processing the dataset {ref} (status {status}); see "
                           f"https://www.kaggle.com/datasets/{ref} and run `make kaggle-run` again")
        log(f"dataset {ref}: {status} …")
        time.sleep(poll_seconds)


def dataset_exists(api, ref: str) -> bool:
    try:
        api.dataset_status(ref)
        return True
    except Exception as err:
        if getattr(getattr(err, "response", None), "status_code", None) == 404:
            return False
        raise


def push_kernel(api, user: str, cfg: Config, accelerator: str, folds, work: Path, log) -> dict:
    """The notebook, parameters injected, as a private GPU kernel; returns what was pushed (ref, version)."""
    from .submission import explain_api_error

    folder = work / "kernel"
    folder.mkdir()
    atomic_write_text(folder / NOTEBOOK.name, json.dumps(notebook_with_parameters(cfg, folds), indent=1))
    metadata = kernel_metadata(user, cfg, accelerator)
    atomic_write_json(folder / "kernel-metadata.json", metadata)
    try:
        response = api.kernels_push(str(folder), acc=accelerator)
    except Exception as err:
        raise explain_api_error(err, f"push the kernel {metadata['id']}") from None
    error = getattr(response, "error", "")
    if error:
        raise KitError(f"Kaggle did not accept the kernel {metadata['id']}: {error}")
    pushed = {"kernel": getattr(response, "ref", "") or metadata["id"],
              "version": getattr(response, "version_number", None), "url": getattr(response, "url", ""),
              "accelerator": accelerator,
              "pushed": datetime.now().isoformat(timespec="seconds"), "downloaded": False}
    if pushed["kernel"].startswith("/code/"):          # the API answers with the kernel's URL path
        pushed["kernel"] = pushed["kernel"][len("/code/"):]
    log(f"kernel {pushed['kernel']} pushed (version {pushed['version']}, {accelerator}, internet off): "
        f"{pushed['url']}")
    return pushed


def follow(api, kernel: str, poll_seconds: float, log) -> None:
    """Wait for the kernel to finish, one progress line a poll; a failed run raises with the end of its log."""
    from .submission import explain_api_error

    started, last = time.monotonic(), None
    while True:
        try:
            response = api.kernels_status(kernel)
        except Exception as err:
            raise explain_api_error(err, f"read the status of {kernel}") from None
        status = status_name(response)
        if status != last:
            log(f"{kernel}: {status} ({(time.monotonic() - started) / 60:.0f} min)")
            last = status
        if status == DONE:
            return
        if status in FAILED:
            message = getattr(response, "failure_message", "") or ""
            raise KitError(f"the kernel {kernel} ended with {status}{f' ({message})' if message else ''}; its log "
                           f"ends: {' | '.join(log_tail(api, kernel)) or 'no log'}; fix it and run `make kaggle-run` "
                           f"again with FORCE=1")
        time.sleep(poll_seconds)


def log_tail(api, kernel: str) -> list[str]:
    """The last lines of the kernel's log (Kaggle's log is a JSON list of {stream_name, time, data})."""
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
        return [line.strip() for line in text.splitlines() if line.strip()][-LOG_TAIL:]


def download_outputs(api, cfg: Config, kernel: str, log) -> Path:
    """The kernel's outputs: submission.csv → submissions/<experiment>-kaggle-<time>.csv (with its details JSON),
    runs/<experiment>/… → runs/<experiment>/…; returns the CSV's path."""
    from .submission import explain_api_error

    with tempfile.TemporaryDirectory(prefix="kit-kaggle-output-") as tmp:
        try:
            api.kernels_output(kernel, tmp, force=True, quiet=True)
        except Exception as err:
            raise explain_api_error(err, f"download the outputs of {kernel}") from None
        out = Path(tmp)
        csv = out / "submission.csv"
        if not csv.is_file():
            raise KitError(f"the kernel {kernel} finished without submission.csv among its outputs; open it on "
                           f"Kaggle to see why")
        target = Path(cfg.submissions_dir) / f"{cfg.name}-kaggle-{datetime.now():%Y%m%d-%H%M%S}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(csv, target)
        runs = out / "runs" / cfg.name
        if runs.is_dir():
            shutil.copytree(runs, experiment_dir(cfg), dirs_exist_ok=True)
        # the kernel's own details (experiment, CV AUC, folds, TTA), and the competition's sample_submission.csv
        # beside the CSV, to validate it against when submitting without the data here
        kernel_details = sorted((out / "submissions").glob("*.json"))
        details = json.loads(kernel_details[-1].read_text()) if kernel_details else {}
        sample_dir = target.with_suffix("")
        if (out / SAMPLE_SUBMISSION_CSV).is_file():
            sample_dir.mkdir(exist_ok=True)
            shutil.copyfile(out / SAMPLE_SUBMISSION_CSV, sample_dir / SAMPLE_SUBMISSION_CSV)
            details["sample_submission"] = str(sample_dir)
        details["kernel"] = kernel
        atomic_write_json(target.with_suffix(".json"), details)
    log(f"outputs of {kernel}: {target}" + (f" and {experiment_dir(cfg)}" if runs.is_dir() else ""))
    return target


def kaggle_run(cfg: Config, accelerator: str = DEFAULT_ACCELERATOR, submit: bool = False, force: bool = False,
               folds="all", poll_seconds: float = POLL_SECONDS, log=print) -> Path:
    """Every step of the module docstring; returns the downloaded submission's path."""
    from .submission import kaggle_api

    check_accelerator(accelerator)
    api = kaggle_api()
    user = api.get_config_value("username")
    if not user:
        raise KitError("the Kaggle credentials name no user (kaggle.json's `username`, or KAGGLE_USERNAME): "
                       "kaggle-run needs it to name the dataset and the kernel")
    state_file = state_path(cfg)
    state = json.loads(state_file.read_text()) if state_file.is_file() and not force else None
    if state is None:
        with tempfile.TemporaryDirectory(prefix="kit-kaggle-run-") as tmp:
            wait_until_ready(api, push_dataset(api, user, Path(tmp), log), poll_seconds, log)
            state = push_kernel(api, user, cfg, accelerator, folds, Path(tmp), log)
        atomic_write_json(state_file, state)
    else:
        log(f"following the kernel pushed at {state['pushed']}: {state['kernel']} (FORCE=1 pushes a new one)")
    follow(api, state["kernel"], poll_seconds, log)
    csv = download_outputs(api, cfg, state["kernel"], log)
    atomic_write_json(state_file, dict(state, downloaded=True, submission=str(csv)))
    if submit:
        from . import api as kit_api

        kit_api.submit(csv, data_dir=None)
    return csv
