"""`make kaggle-run`: train and predict on Kaggle's free GPUs from a laptop, with the real `kaggle` client.

1. the kit bundle (kit/bundle.py) as a private dataset `<user>/hcd-kit`: created the first time, versioned after;
2. notebooks/kaggle.ipynb as a private kernel `<user>/hcd-kit-<experiment>`, the competition and the kit attached,
   GPU on (ACCELERATOR), internet off, the effective config injected into its parameters cell;
3. its status followed with one progress line; on failure, one line with the end of its log;
4. its outputs downloaded: submission.csv into submissions/<experiment>-kaggle-<time>.csv, each fold's results into
   runs/<experiment>/ (what the notebook keeps: best.pt, metrics, OOF, history; not the cache), or into
   runs/<experiment>-kaggle-v<n>/ when a local fold there differs: local work is never overwritten
   (`bring_in_folds`); outputs of another experiment are refused;
5. with SUBMIT=1, that CSV submitted as `make submit` does.

What was pushed is recorded in runs/<experiment>/kaggle-run.json: run again after an interruption and it follows the
same kernel version instead of pushing a new one (FORCE=1 pushes anew).
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import pprint
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from .bundle import REPO, write_bundle
from .competition import COMPETITION, SAMPLE_SUBMISSION_CSV
from .config import Config, from_dict, to_dict
from .errors import KitError
from .io import atomic_path, atomic_write_json, atomic_write_text, path_inside, timestamp
from .kaggle_api import (
    dataset_status,
    download_kernel_output,
    kaggle_api,
    kaggle_username,
    kernel_log_tail,
    kernel_status,
    upload_dataset,
    upload_kernel,
)
from .progress import say
from .runs import experiment_dir, flat_config, fold_dir
from .submission import read_submission_details

DATASET_SLUG = "hcd-kit"
NOTEBOOK = REPO / "notebooks" / "kaggle.ipynb"
PATH_KEYS = frozenset({"data_dir", "out_dir", "cache_dir", "submissions_dir"})   # Kaggle's paths are its own
DEFAULT_ACCELERATOR = "NvidiaTeslaT4"
# Kaggle's GPU machine shapes (its kernels docs, Feb 2026; some only for some competitions). The P100 is retired and
# Kaggle's torch has no kernels for it (kit/device.py); TPUs run no CUDA: neither can train the kit.
GPU_ACCELERATORS = ("NvidiaTeslaT4", "NvidiaTeslaT4Highmem", "NvidiaL4", "NvidiaL4X1", "NvidiaTeslaA100",
                    "NvidiaH100", "NvidiaRtxPro6000")
KERNEL_SLUG_LENGTH = 50           # Kaggle's limit on a kernel's slug (its title, 5 to 50 characters)
POLL_SECONDS = 30.0
LOG_TAIL = 5
DONE, FAILED = "complete", ("error", "cancel_requested", "cancel_acknowledged")


def state_path(cfg: Config) -> Path:
    return experiment_dir(cfg) / "kaggle-run.json"


def notebook_with_parameters(cfg: Config, folds) -> dict:
    """notebooks/kaggle.ipynb with its parameters cell set to `cfg` (every key but the paths, which are Kaggle's).
    SUBMIT stays False: the kernel runs with internet off, and `make kaggle-run SUBMIT=1` submits from here."""
    notebook = json.loads(NOTEBOOK.read_text())
    overrides = dict(flat_config(cfg, neutral=PATH_KEYS), name=cfg.name)
    lines = ["# Parameters (written by `make kaggle-run`)\n",
             'CONFIG = "baseline_bn"  # every key below overrides it: the effective config of the run\n',
             f"OVERRIDES = {pprint.pformat(overrides, width=110, sort_dicts=False)}\n",
             f"FOLDS = {folds!r}\n", 'PARALLEL = "auto"\n', "SUBMIT = False\n"]
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    cells[0]["source"] = lines
    return notebook


def kernel_slug(name: str) -> str:
    """hcd-kit-<experiment> as Kaggle spells slugs (lower case, digits, hyphens), one per experiment name: a name
    that is not already such a slug (`a_b`, `A-b`) gets a short hash of itself, so `a_b` and `a-b` never share a
    kernel (and download each other's outputs)."""
    readable = slug(name)
    suffix = "" if readable == name else "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    room = KERNEL_SLUG_LENGTH - len(DATASET_SLUG) - 1 - len(suffix)
    return f"{DATASET_SLUG}-{readable[:room].strip('-')}{suffix}"


def kernel_metadata(user: str, cfg: Config, accelerator: str) -> dict:
    return {"id": f"{user}/{kernel_slug(cfg.name)}", "title": kernel_slug(cfg.name),
            "code_file": NOTEBOOK.name, "language": "python", "kernel_type": "notebook", "is_private": True,
            "enable_gpu": True, "enable_tpu": False, "enable_internet": False,
            "dataset_sources": [f"{user}/{DATASET_SLUG}"], "competition_sources": [COMPETITION],
            "kernel_sources": [], "model_sources": [], "machine_shape": accelerator}


def slug(text: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return "-".join(part for part in cleaned.split("-") if part) or "run"


def check_accelerator(accelerator: str) -> str:
    """Kaggle's spelling of a GPU it offers (matched without regard to case), checked before anything is sent."""
    known = {name.lower(): name for name in GPU_ACCELERATORS}
    if accelerator.strip().lower() in known:
        return known[accelerator.strip().lower()]
    if "p100" in accelerator.lower():
        raise KitError(f"ACCELERATOR={accelerator}: Kaggle's torch has no kernels for the P100; pick a T4 "
                       f"(NvidiaTeslaT4, the default) or an L4 (NvidiaL4)")
    why = "TPUs run no CUDA, which the kit trains on" if "tpu" in accelerator.lower() else "not a Kaggle GPU"
    raise KitError(f"ACCELERATOR={accelerator}: {why}; pick one of {', '.join(GPU_ACCELERATORS)} (default "
                   f"{DEFAULT_ACCELERATOR}, T4 x2)")


def push_dataset(api, user: str, work: Path, log) -> str:
    """The kit bundle as the private dataset <user>/hcd-kit: a new version when it exists, else created."""
    folder = work / "dataset"
    folder.mkdir()
    write_bundle(folder / f"{DATASET_SLUG}.zip")
    ref = f"{user}/{DATASET_SLUG}"
    atomic_write_json(folder / "dataset-metadata.json", {"title": DATASET_SLUG, "id": ref,
                                                          "licenses": [{"name": "CC0-1.0"}]})
    versioned = upload_dataset(api, folder, ref, f"kit bundle {datetime.now():%Y-%m-%d %H:%M}", "the kit bundle")
    log(f"kit bundle {'versioned' if versioned else 'created'} as the private dataset {ref}")
    return ref


# ----------------------------------------------------------------------------------------------------------------
# Folds trained elsewhere (a Kaggle kernel's outputs)
# ----------------------------------------------------------------------------------------------------------------

def same_files(first: Path, second: Path) -> bool:
    """Two folders with the same files, byte for byte."""
    def files(root: Path) -> dict:
        return {p.relative_to(root): p for p in root.rglob("*") if p.is_file()}
    ours, theirs = files(first), files(second)
    return ours.keys() == theirs.keys() and all(filecmp.cmp(ours[k], theirs[k], shallow=False) for k in ours)


def bring_in_folds(cfg: Config, source: Path, elsewhere: str, log=say) -> Config:
    """Move the fold folders under `source` (another machine's runs/<experiment>/, e.g. a Kaggle kernel's outputs,
    on the same disk as out_dir) into this experiment, never over a local fold: when a local fold<k>/ holds other
    files than the incoming one, everything goes to the experiment `elsewhere` instead (one name per source, so it
    never meets a conflict of its own). A fold already here byte for byte is left as it is. Returns the config of
    the experiment that received them (cfg, or cfg with name=elsewhere): its folds predict, report and blend like
    local ones (they have no last.pt, so they cannot be extended)."""
    incoming = sorted(p for p in source.glob("fold*") if p.is_dir() and p.name[4:].isdigit())

    def conflicts(target: Config) -> list[int]:
        clashing = []
        for fold_source in incoming:
            local = fold_dir(target, int(fold_source.name[4:]))
            if local.is_dir() and any(local.iterdir()) and not same_files(fold_source, local):
                clashing.append(int(fold_source.name[4:]))
        return clashing

    target = cfg
    clashing = conflicts(cfg)
    if clashing:
        target = from_dict(dict(to_dict(cfg), name=elsewhere), source="kaggle-run")
        if conflicts(target):
            raise KitError(f"{experiment_dir(target)} already holds other folds {conflicts(target)}: nothing was "
                           f"replaced; move it away and run `make kaggle-run` again")
        log(f"local fold(s) {', '.join(map(str, clashing))} of `{cfg.name}` differ from the kernel's: kept as they "
            f"are; the kernel's folds go to `{target.name}` (predict them with ARGS='name={target.name}')")
    destination = experiment_dir(target)
    destination.mkdir(parents=True, exist_ok=True)
    for fold_source in incoming:
        final = fold_dir(target, int(fold_source.name[4:]))
        if final.exists() and any(final.iterdir()):
            continue                                   # the same files, from an earlier download
        staged = destination / f".{fold_source.name}.incoming"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.move(fold_source, staged)              # a rename on one disk; a copy across disks
        if final.exists():
            final.rmdir()                              # empty
        staged.rename(final)
    for path in source.iterdir():                      # the experiment's report and figures, where there are none
        if path.is_file() and not (destination / path.name).exists():
            with atomic_path(destination / path.name) as tmp:
                shutil.copyfile(path, tmp)
    return target


def wait_until_ready(api, ref: str, poll_seconds: float, log, limit_seconds: float = 1800) -> None:
    """Kaggle processes a new dataset version before notebooks see it: a kernel pushed earlier would attach the old
    bundle."""
    started = time.monotonic()
    while True:
        status = dataset_status(api, ref)
        if status == "ready":
            return
        if status in ("failed", "deleted") or time.monotonic() - started > limit_seconds:
            raise KitError(f"Kaggle did not finish processing the dataset {ref} (status {status}); see "
                           f"https://www.kaggle.com/datasets/{ref} and run `make kaggle-run` again")
        log(f"dataset {ref}: {status} …")
        time.sleep(poll_seconds)


def push_kernel(api, user: str, cfg: Config, accelerator: str, folds, work: Path, log) -> dict:
    """The notebook, parameters injected, as a private GPU kernel; returns what was pushed (ref, version)."""
    folder = work / "kernel"
    folder.mkdir()
    atomic_write_text(folder / NOTEBOOK.name, json.dumps(notebook_with_parameters(cfg, folds), indent=1))
    metadata = kernel_metadata(user, cfg, accelerator)
    atomic_write_json(folder / "kernel-metadata.json", metadata)
    pushed = dict(upload_kernel(api, folder, metadata["id"], accelerator), accelerator=accelerator,
                  pushed=datetime.now().isoformat(timespec="seconds"))
    log(f"kernel {pushed['kernel']} pushed (version {pushed['version']}, {accelerator}, internet off): "
        f"{pushed['url']}")
    return pushed


def follow(api, kernel: str, poll_seconds: float, log) -> None:
    """Wait for the kernel to finish, one progress line a poll; a failed run raises with the end of its log."""
    started, last = time.monotonic(), None
    while True:
        status, message = kernel_status(api, kernel)
        if status != last:
            log(f"{kernel}: {status} ({(time.monotonic() - started) / 60:.0f} min)")
            last = status
        if status == DONE:
            return
        if status in FAILED:
            log_end = " | ".join(kernel_log_tail(api, kernel, LOG_TAIL)) or "no log"
            raise KitError(f"the kernel {kernel} ended with {status}{f' ({message})' if message else ''}; its log "
                           f"ends: {log_end}; fix it and run `make kaggle-run` again with FORCE=1")
        time.sleep(poll_seconds)


def download_outputs(api, cfg: Config, pushed: dict, log) -> Path:
    """The kernel's outputs: submission.csv → submissions/<experiment>-kaggle-<time>.csv (with its details JSON),
    runs/<experiment>/fold<k>/ → runs/<experiment>/ where no local fold differs (else runs/<experiment>-kaggle-v<n>/:
    `bring_in_folds`); returns the CSV's path. Outputs of another experiment are refused."""
    kernel = pushed["kernel"]
    version = pushed.get("version")
    run_label = f"v{version}" if isinstance(version, int) else "".join(c for c in pushed["pushed"] if c.isdigit())
    experiment = experiment_dir(cfg)
    experiment.mkdir(parents=True, exist_ok=True)
    # downloaded beside the runs (the folders the user gave, and one disk: the folds move in by renaming)
    with tempfile.TemporaryDirectory(prefix=".kaggle-output-", dir=experiment) as tmp:
        out = download_kernel_output(api, kernel, Path(tmp))
        csv = out / "submission.csv"
        if not csv.is_file():
            raise KitError(f"the kernel {kernel} finished without submission.csv among its outputs; open it on "
                           f"Kaggle to see why")
        # the kernel's own details (experiment, CV AUC, folds, TTA), and the competition's sample_submission.csv
        # beside the CSV, to validate it against when submitting without the data here
        kernel_details = sorted((out / "submissions").glob("*.json"))
        details = read_submission_details(kernel_details[-1].with_suffix(".csv")) if kernel_details else {}
        trained = sorted(p.name for p in (out / "runs").glob("*") if p.is_dir())
        if details.get("experiment", cfg.name) != cfg.name or (trained and cfg.name not in trained):
            raise KitError(f"the kernel {kernel} holds the outputs of `{details.get('experiment') or trained[0]}`, "
                           f"not of `{cfg.name}`: nothing was downloaded; run `make kaggle-run` for that "
                           f"experiment, or FORCE=1 to push `{cfg.name}` anew")
        target = path_inside(cfg.submissions_dir, f"{cfg.name}-kaggle-{timestamp()}.csv")
        with atomic_path(target) as tmp_csv:
            shutil.copyfile(csv, tmp_csv)
        received = cfg
        runs = out / "runs" / cfg.name
        if runs.is_dir():
            received = bring_in_folds(cfg, runs, f"{cfg.name}-kaggle-{run_label}", log)
        sample_dir = target.with_suffix("")
        if (out / SAMPLE_SUBMISSION_CSV).is_file():
            sample_dir.mkdir(exist_ok=True)
            with atomic_path(sample_dir / SAMPLE_SUBMISSION_CSV) as tmp_sample:
                shutil.copyfile(out / SAMPLE_SUBMISSION_CSV, tmp_sample)
            details["sample_submission"] = str(sample_dir)
        details["kernel"] = kernel
        atomic_write_json(target.with_suffix(".json"), details)
    log(f"outputs of {kernel}: {target}" + (f" and {experiment_dir(received)}" if runs.is_dir() else ""))
    return target


def kaggle_run(cfg: Config, accelerator: str = DEFAULT_ACCELERATOR, submit: bool = False, force: bool = False,
               folds="all", poll_seconds: float = POLL_SECONDS, data_dir: str | Path | None = None,
               log=say) -> Path:
    """Every step of the module docstring; returns the downloaded submission's path. `data_dir`: the
    sample_submission.csv to check the CSV against before submitting (else the one the kernel brought back)."""
    accelerator = check_accelerator(accelerator)
    api = kaggle_api()
    user = kaggle_username(api)
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
    csv = download_outputs(api, cfg, state, log)
    atomic_write_json(state_file, dict(state, submission=str(csv)))
    if submit:
        from . import api as kit_api

        # FORCE=1 means "push a new kernel" here; `make submit` is where it means "upload anyway"
        kit_api.submit(csv, data_dir=data_dir, log=log,
                       upload_anyway=f"run `make submit FILE={csv} FORCE=1` (kaggle-run's FORCE=1 pushes a new kernel)")
    return csv
