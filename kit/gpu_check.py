"""`make gpu-check`: the GPU path proved on the card at hand, in one script sized to a time budget (`--minutes`,
default 7), its rows in the order of their value:

  1. the competition's train split (220,025 patches, 6.1 GB): would the kit hold it in this card's memory, against
     the memory free now; if so, allocated and filled
  2. one epoch of the default config (baseline_bn) on ~50k generated patches (fold 0 of 5) with
     torch.cuda.set_sync_debug_mode("error") over the training loop (any implicit GPU→CPU wait there raises), in
     the precision the kit picks and in forced fp16 (what a T4 runs)
  3. correctness on the card (kit/gpu_correctness.py): train and resume under sync debug, fp16 with loss scaling,
     TTA against the CPU, DDP over NCCL with 2 GPUs
  4. the same epoch of the 224 px recipes and the other configs, backbones unfrozen; compiled runs (two epochs:
     compile seconds and steady-state images/s apart)
  5. SWA: one averaged epoch of a 224 px recipe and its BatchNorm pass in the training precision
  6. a TTA prediction of the test set; `make bench`; with several GPUs, baseline_bn's epoch as DDP over every GPU and
     as N folds at once, in images/s against the one-process row
Each epoch row has its peak memory in training and in the fold's TTA pass; from them, one line per config says
whether it fits a 16 GB T4 at its batch with the competition's split held on the GPU. Every row is printed and
appended to runs/gpu-check/gpu-check-<time>.jsonl as it finishes (a run cut off keeps them; `--rows` prints their
table); the summary JSON and table come at the end. Runs that fail are marked FAILED with their error, the others
go on; the exit status says whether all passed. No GPU: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from .competition import SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_DIR, TRAIN_IMAGES, TRAIN_LABELS_CSV
from .config import CONFIGS_DIR, load_config
from .demo_data import make_demo_data
from .device import autocast_dtype, card_name, precision_name, select_device, spare_memory, sync_debug_error
from .errors import KitError, first_line
from .gpu_report import SCALE_OUT_CONFIG, format_check, format_report, format_resident, format_run, read_rows, summary
from .hub import is_hub_name
from .io import atomic_write_csv, atomic_write_json, timestamp
from .progress import say
from .runs import HISTORY, fold_dir

# hub models (hf-hub:…) are left out: their weights need the network (and, gated, the user's own token)
SHIPPED = tuple(sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml")
                       if path.stem != "demo" and not is_hub_name(load_config(path).model.name)))
ONE_PRECISION = ("compete_",)      # the 224 px recipe: in the kit's precision only, to keep the check short
COMPILED = ("baseline_bn", "effnet_b0")     # compiling takes a minute or so each: two families


def timing_data(folder: Path, images: int, unique: int = 5000, test: int = 2000) -> Path:
    """`images` training patches in the Kaggle layout, fast: `unique` generated ones, hard-linked under new ids up
    to the count (decoding and training cost the same whatever the pixels)."""
    source = make_demo_data(folder / "unique", n_train=min(unique, images), n_test=test, seed=0)
    labels = pd.read_csv(source / TRAIN_LABELS_CSV, dtype={"id": str})
    data = folder / "data"
    (data / TRAIN_DIR).mkdir(parents=True)
    shutil.copytree(source / TEST_DIR, data / TEST_DIR)
    shutil.copy(source / SAMPLE_SUBMISSION_CSV, data / SAMPLE_SUBMISSION_CSV)
    rows = []
    for number in range(images):
        original = labels.iloc[number % len(labels)]
        new_id = f"{number:08x}{original['id'][8:]}"
        os.link(source / TRAIN_DIR / f"{original['id']}.tif", data / TRAIN_DIR / f"{new_id}.tif")
        rows.append((new_id, int(original["label"])))
    atomic_write_csv(data / TRAIN_LABELS_CSV, pd.DataFrame(rows, columns=["id", "label"]))
    return data


def check_config(config: str, data_dir: Path, out_dir: Path, device: str, amp_dtype: str = "auto",
                 compiled: bool = False, swa: bool = False):
    """`config` as the check runs it: fold 0 of 5 on the generated data, random weights (no download). One epoch;
    two when compiled (the first compiles, the second is the steady state); with `swa` one averaged epoch and the
    BatchNorm pass over the training split that SWA ends with."""
    name = f"{config}-{amp_dtype}{'-compiled' if compiled else ''}{'-swa' if swa else ''}"
    # the backbone trains in the timed epoch: a frozen one would time the head alone (224 px recipes freeze epoch 1)
    return load_config(config, {"name": name, "data_dir": str(data_dir), "out_dir": str(out_dir),
                                "epochs": 2 if compiled else 1, "folds.n_splits": 5, "amp_dtype": amp_dtype,
                                "train.compile": compiled, "train.freeze_backbone_epochs": 0,
                                "model.pretrained": False, "model.pretrained_file": "",
                                "train.swa_epochs": 1 if swa else 0, "train.early_stopping": 0,
                                "device": device, "submissions_dir": str(out_dir / "submissions")})


def failure(err: Exception) -> str:
    """A failed row's error: the exception's type and first line."""
    return f"{type(err).__name__}: {first_line(err, when_empty='no details')}"


def optional_float(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def epoch_numbers(history: pd.DataFrame, compiled: bool) -> dict:
    """images/s and seconds of the last epoch (a compiled run's second: the steady state), the peak memory over the
    epochs, and for a compiled run how much longer its first epoch took (the compile)."""
    last = history.iloc[-1]
    numbers = {"train_images_per_s": float(last["images_per_s"]), "epoch_seconds": float(last["seconds"]),
               "peak_memory_mb": optional_float(history["peak_memory_mb"].max())}
    if compiled:
        first = float(history.iloc[0]["seconds"])
        numbers.update(first_epoch_seconds=first, compile_seconds=max(0.0, first - float(last["seconds"])))
    return numbers


def one_epoch(config: str, data_dir: Path, out_dir: Path, amp_dtype: str, compiled: bool, device: str,
              swa: bool = False) -> dict:
    """Fold 0 of `config` (`check_config`) under sync-debug "error": its numbers, or the error. A compiled row's
    images/s and epoch seconds are the second epoch's; compile_seconds is how much longer the first one took."""
    from .array_cache import resident_bytes
    from .fold import train_fold

    cfg = check_config(config, data_dir, out_dir, device, amp_dtype, compiled, swa)
    row = {"config": config, "precision": amp_dtype, "compiled": compiled, "swa": swa, "batch_size": cfg.batch_size}
    started = time.perf_counter()
    try:
        with sync_debug_error():
            metrics = train_fold(cfg, 0, log=lambda *_: None)
        row.update(status="ok", **epoch_numbers(pd.read_csv(fold_dir(cfg, 0) / HISTORY), compiled),
                   tta_peak_memory_mb=optional_float(metrics.get("tta_peak_memory_mb")),
                   resident_split_mb=resident_bytes(select_device(device)) / 2**20,
                   val_auc=float(metrics["best_val_auc"]), fold_seconds=time.perf_counter() - started)
        if swa:
            row.update(swa_bn_seconds=optional_float(metrics.get("swa_bn_seconds")),
                       swa_bn_peak_memory_mb=optional_float(metrics.get("swa_bn_peak_memory_mb")))
    except Exception as err:     # a failed run is reported, and the check goes on with the others
        row.update(status="FAILED", error=failure(err), where=traceback.format_exc(limit=-3))
    return row


def competition_split(device: str) -> dict:
    """Whether the kit would hold the competition's train split (220,025 patches, 6.1 GB as uint8) in this card's
    memory, against the memory free now; when it would, the allocation is made and filled to prove it."""
    from .array_cache import RESIDENT_SHARE, fits_resident
    from .data import ROW_BYTES

    needed = TRAIN_IMAGES * ROW_BYTES
    row = {"images": TRAIN_IMAGES, "split_mb": needed / 2**20}
    torch_device = select_device(device)
    if torch_device.type != "cuda":
        return {**row, "status": "skipped", "error": "on the CPU the split stays memory-mapped"}
    spare = spare_memory(torch_device)
    row.update(spare_mb=spare / 2**20, total_mb=torch.cuda.get_device_properties(torch_device).total_memory / 2**20,
               share=RESIDENT_SHARE, resident=fits_resident(needed, torch_device))
    if row["resident"]:
        try:
            started = time.perf_counter()
            torch.empty(needed, dtype=torch.uint8, device=torch_device).fill_(1)   # freed once filled
            torch.cuda.synchronize(torch_device)
            row["fill_seconds"] = time.perf_counter() - started
            torch.cuda.empty_cache()
        except torch.cuda.OutOfMemoryError as err:
            return {**row, "status": "FAILED", "error": f"the fit check said yes, the allocation failed: {err}"}
    return {**row, "status": "ok"}


def correctness(name: str, data_dir: Path, out_dir: Path, device: str) -> dict:
    """One check of kit/gpu_correctness.py: its numbers, or the assertion that failed."""
    from .gpu_correctness import CHECKS

    started = time.perf_counter()
    try:
        found = CHECKS[name](data_dir, out_dir / name.replace(" ", "-"), device)
        return {"check": name, "status": "ok", "seconds": time.perf_counter() - started, **found}
    except Exception as err:
        return {"check": name, "status": "FAILED", "seconds": time.perf_counter() - started,
                "error": failure(err),
                "where": traceback.format_exc(limit=-3)}


def tta_prediction(config: str, data_dir: Path, out_dir: Path, device: str) -> dict:
    """The test set through the trained fold 0 × 8 D4 views (what `make predict` does per fold)."""
    from .predict import predict_test

    cfg = check_config(config, data_dir, out_dir, device)          # the run `one_epoch` trained in "auto"
    started = time.perf_counter()
    try:
        prediction = predict_test(cfg, allow_missing_folds=True, log=lambda *_: None)
        seconds = time.perf_counter() - started
        return {"config": config, "status": "ok", "views": prediction.views, "seconds": seconds,
                "images_per_s": len(prediction.ids) / seconds}
    except Exception as err:
        return {"config": config, "status": "FAILED", "error": f"{type(err).__name__}: {err}"}




def scale_out(config: str, data_dir: Path, out_dir: Path, processes: int, device: str) -> list[dict]:
    """One epoch of `config` on `processes` processes, both ways the kit scales out: DDP on one fold (the rank-0
    images/s counts every rank's images) and fold-parallel on `processes` folds (their images/s summed)."""
    import subprocess
    import sys

    from .config import save_config
    from .parallel import kit_process_environment, train_folds_parallel

    rows = []
    one = check_config(config, data_dir, out_dir, device)
    one = replace(one, tta=replace(one.tta, views="none"))      # training images/s is what is compared
    ddp = replace(one, name=f"{config}-ddp{processes}")
    config_path = out_dir / f"{ddp.name}.yaml"
    save_config(ddp, config_path)
    started = time.perf_counter()
    command = [sys.executable, "-m", "kit.launch", "--nproc_per_node", str(processes), "-m", "kit", "train",
               "--fold", "0", "--config", str(config_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=kit_process_environment())
    rows.append(scale_row(config, f"DDP × {processes}", ddp, [0], done.returncode, done.stderr,
                          time.perf_counter() - started))
    parallel = replace(one, name=f"{config}-parallel{processes}",
                       folds=replace(one.folds, n_splits=max(2, processes)))
    started = time.perf_counter()
    try:
        train_folds_parallel(parallel, processes, log=lambda *_: None)
        code, error = 0, ""
    except KitError as err:
        code, error = 2, str(err)
    rows.append(scale_row(config, f"{processes} folds at once", parallel, range(processes), code, error,
                          time.perf_counter() - started))
    return rows


def scale_row(config: str, mode: str, cfg, folds, code: int, error: str, seconds: float) -> dict:
    row = {"config": config, "mode": mode, "seconds": seconds}
    if code != 0:
        lines = error.strip().splitlines() or ["no output"]
        return {**row, "status": "FAILED", "error": next((line for line in lines if line.startswith("error:")),
                                                         lines[-1])}
    histories = [pd.read_csv(fold_dir(cfg, fold) / HISTORY).iloc[-1] for fold in folds]
    row = {**row, "status": "ok", "train_images_per_s": float(sum(h["images_per_s"] for h in histories)),
           "epoch_seconds": float(max(h["seconds"] for h in histories))}
    if mode.startswith("DDP"):        # waits DDP makes by design, which sync debug does not see (it runs them itself)
        row["syncs"] = ("DDP waits by design: a gradient all-reduce per step, the bucket rebuild after the first "
                        "step" + (", SyncBatchNorm's all-gather per BatchNorm layer" if cfg.train.sync_bn else ""))
    return row


DEFAULT_CONFIG = "baseline_bn"      # the kit's default: its rows come first
QUICK = {"images": 2000, "test_images": 200, "bench_images": 512, "bench_seconds": 0.2}
COMPILE_SECONDS = 90.0              # what a cold torch.compile adds to a row, for the time budget


class RowLog:
    """Each finished row printed at once (flushed) and appended to gpu-check-<time>.jsonl (flushed and fsync'd),
    so a check cut off at any point leaves every row it finished; the summary is rebuilt from that file."""

    def __init__(self, path: Path, log):
        self.path, self.log, self.rows = path, log, []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, kind: str, row: dict, line: str | None = None) -> dict:
        row = {"kind": kind, **row}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows.append(row)
        if line:
            self.log(line)
        return row


def planned_epochs(configs, precisions: list[str], compiled) -> list[tuple[str, str, bool]]:
    """(config, precision, compiled) in the order of their value: the kit's default config in its precision, then
    forced fp16 (what a T4 runs), then the 224 px recipes, then the other configs, then compiled runs."""
    configs = list(configs)
    first = [c for c in configs if c == DEFAULT_CONFIG]
    recipes = [c for c in configs if c.startswith(ONE_PRECISION)]
    others = [c for c in configs if c not in first and c not in recipes]
    plan = [(c, p, False) for c in first for p in precisions]
    plan += [(c, precisions[0], False) for c in recipes]
    plan += [(c, p, False) for c in others for p in precisions]
    plan += [(c, precisions[0], True) for c in configs if c in compiled]
    return plan


def estimate_seconds(plan_row: tuple[str, str, bool], finished: list[dict], swa: bool = False) -> float:
    """What a row will take, from the rows already done (0 before the first: the first row always runs)."""
    done = [r["fold_seconds"] for r in finished if r.get("kind") == "epoch" and r.get("status") == "ok"]
    if not done:
        return 0.0
    config, _, compiled = plan_row
    one = min(done) * (5.0 if config.startswith(ONE_PRECISION) else 1.0)
    return one * (2.0 if compiled else 1.5 if swa else 1.0) + (COMPILE_SECONDS if compiled else 0.0)


CORRECTNESS_SECONDS = 20.0          # a kit/gpu_correctness.py check on the 600-patch set, for the time budget
SWA_CONFIG = "compete_effnet_b0"    # SWA's BatchNorm pass costs most at 224 px: the row runs a 224 px recipe


def default_checks(device: str) -> tuple[str, ...]:
    """Every correctness check on a GPU (DDP where there are 2 GPUs); none on the CPU, where `make test` proves
    the same paths."""
    from .gpu_correctness import CHECKS, NEEDS_TWO_GPUS

    if device != "cuda":
        return ()
    return tuple(name for name in CHECKS if name not in NEEDS_TWO_GPUS or torch.cuda.device_count() >= 2)


def run_gpu_check(out_dir: str | Path = "runs/gpu-check", images: int = 50_000, test_images: int = 2000,
                  configs=SHIPPED, compiled=COMPILED, device: str = "cuda", bench_images: int = 8192,
                  bench_seconds: float = 1.0, scale_out_processes: int | None = None, minutes: float = 7.0,
                  checks=None, swa: bool = True, log=say) -> tuple[Path, bool]:
    """Every step of the module docstring within `minutes`; returns the summary JSON's path and whether every run
    that ran passed. Rows run in the order of their value: the competition split's fit check (instant), the
    default config's epochs, the correctness checks, the other epochs (`planned_epochs`), SWA, TTA, bench,
    scale-out; one that would not fit in the time left is recorded as skipped. `device="cpu"` runs the same steps
    on the CPU (the tests use it, small). `checks`: names from kit/gpu_correctness.py (default: `default_checks`).
    `scale_out_processes`: the processes of scale-out (default: the GPU count; skipped below 2)."""
    from .bench import run_bench
    from .gpu_correctness import CHECK_IMAGES, CHECK_TEST_IMAGES

    if device == "cuda" and not torch.cuda.is_available():
        raise KitError("make gpu-check needs a GPU, and PyTorch sees none here (torch.cuda.is_available() is False); "
                       "run it on a GPU machine, e.g. a Kaggle notebook with a T4 or L4, or pass --device cpu")
    torch_device = select_device(device)          # refuses a card this torch has no kernels for
    card = card_name(torch_device) if torch_device.type == "cuda" else "cpu"
    auto = autocast_dtype(torch_device, amp=True)
    precisions = ["auto"] + (["fp16"] if auto == torch.bfloat16 else [])     # a bf16 card also runs a T4's fp16
    checks = default_checks(device) if checks is None else tuple(checks)
    stamp = timestamp()
    rows = RowLog(Path(out_dir) / f"gpu-check-{stamp}.jsonl", log)
    header = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
              "kit_precision": precision_name(auto), "images": images, "minutes": minutes}
    rows.add("header", header, f"gpu-check on {card}, torch {torch.__version__}; the kit's precision: "
                               f"{precision_name(auto)}; {minutes:g} min budget; rows in {rows.path}")
    started = time.monotonic()
    deadline = started + minutes * 60

    def fits(estimate: float) -> bool:
        return time.monotonic() + estimate <= deadline

    def first_epoch_pending() -> bool:       # the first epoch row always runs: the check proves something
        return not any(r["kind"] == "epoch" and r["status"] != "skipped" for r in rows.rows)

    def run_epochs(plan: list[tuple[str, str, bool]], data_dir: Path, runs: Path, with_swa: bool = False) -> None:
        for plan_row in plan:
            config, precision, is_compiled = plan_row
            if not first_epoch_pending() and not fits(estimate_seconds(plan_row, rows.rows, with_swa)):
                row = {"config": config, "precision": precision, "compiled": is_compiled, "swa": with_swa,
                       "status": "skipped", "error": "time budget"}
            else:
                row = one_epoch(config, data_dir, runs, precision, is_compiled, device, swa=with_swa)
            rows.add("epoch", row, format_run(row))

    row = competition_split(device)
    rows.add("resident", row, format_resident(row))
    with tempfile.TemporaryDirectory(prefix="kit-gpu-check-") as tmp:
        data_dir, runs = timing_data(Path(tmp), images, test=test_images), Path(tmp) / "runs"
        plan = planned_epochs(configs, precisions, compiled)
        first = [r for r in plan if r[0] == DEFAULT_CONFIG and not r[2]]
        log(f"one epoch per config on {images:,} generated patches (sync debug: error), backbones unfrozen …")
        run_epochs(first, data_dir, runs)
        if checks:
            log(f"correctness on the card ({len(checks)} checks, {CHECK_IMAGES} generated patches) …")
            check_data = make_demo_data(Path(tmp) / "check-data", n_train=CHECK_IMAGES, n_test=CHECK_TEST_IMAGES,
                                        seed=1)
            for name in checks:
                row = correctness(name, check_data, Path(tmp) / "checks", device) if fits(CORRECTNESS_SECONDS) \
                    else {"check": name, "status": "skipped", "error": "time budget"}
                rows.add("correctness", row, format_check(row))
        run_epochs([r for r in plan if r not in first], data_dir, runs)
        if swa:
            swa_config = next((c for c in (SWA_CONFIG, DEFAULT_CONFIG) if c in configs), list(configs)[0])
            log(f"SWA: {swa_config}, one averaged epoch and its BatchNorm pass in the training precision …")
            run_epochs([(swa_config, "auto", False)], data_dir, runs, with_swa=True)
        tta_config = DEFAULT_CONFIG if DEFAULT_CONFIG in configs else list(configs)[0]
        if fits(10.0):
            log("TTA prediction of the test set …")
            rows.add("tta", tta_prediction(tta_config, data_dir, runs, device))
        if fits(30.0):
            log("make bench …")
            rows.add("bench", {"status": "ok", **run_bench(images=bench_images, device=device,
                                                           batch_size=min(256, bench_images),
                                                           min_seconds=bench_seconds, log=log)})
        processes = torch.cuda.device_count() if scale_out_processes is None else scale_out_processes
        if processes >= 2 and fits(60.0):
            log(f"scale-out: {SCALE_OUT_CONFIG} on {processes} processes, DDP and fold-parallel …")
            for row in scale_out(SCALE_OUT_CONFIG, data_dir, runs, processes, device):
                rows.add("scale_out", row)
    report = summary(read_rows(rows.path))
    report["seconds"] = time.monotonic() - started
    path = rows.path.with_suffix(".json")
    atomic_write_json(path, report)
    log("\n" + format_report(report))
    return path, report["passed"]
