"""`make gpu-check`: the GPU path proved on the card at hand, in one script (a few minutes on one GPU).

  1. `make bench DEVICE=cuda`: input pipelines, step, epoch (input + step + EMA), TTA, in each precision the card has
  2. one epoch of every shipped config on ~50k generated patches (fold 0 of 5: 40k train / 10k valid) with
     torch.cuda.set_sync_debug_mode("error") over the training loop (any GPU→CPU wait there raises), in the precision
     the kit picks and in forced fp16 (what a T4 runs), compile off; and compiled for a few configs
  3. a TTA prediction of the test set with the trained fold
  4. with several GPUs: the same epoch of baseline_bn as DDP over every GPU (`make train NPROC=N`) and as N folds at
     once (`train-all PARALLEL=N`), in images/s against the one-process row
It writes one JSON (runs/gpu-check/gpu-check-<time>.json) and prints a table: card, torch, images/s, peak memory,
epoch seconds. Runs that fail are marked FAILED with their error, the others go on; the exit status says whether
all passed. No GPU: one line, exit 2.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from .competition import SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_DIR, TRAIN_LABELS_CSV
from .config import CONFIGS_DIR, load_config
from .demo_data import make_demo_data
from .device import SYNC_DEBUG_VARIABLE, autocast_dtype, card_name, precision_name, select_device
from .errors import KitError
from .io import atomic_write_csv, atomic_write_json, read_json_lines
from .runs import HISTORY, fold_dir

SHIPPED = tuple(sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml") if path.stem != "demo"))
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


@contextmanager
def sync_debug_error():
    previous = os.environ.get(SYNC_DEBUG_VARIABLE)
    os.environ[SYNC_DEBUG_VARIABLE] = "error"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SYNC_DEBUG_VARIABLE, None)
        else:
            os.environ[SYNC_DEBUG_VARIABLE] = previous


def check_config(config: str, data_dir: Path, out_dir: Path, device: str, amp_dtype: str = "auto",
                 compiled: bool = False):
    """`config` as the check runs it: one epoch of 5 folds on the generated data, random weights (no download)."""
    name = f"{config}-{amp_dtype}{'-compiled' if compiled else ''}"
    # the backbone trains in the timed epoch: a frozen one would time the head alone (224 px recipes freeze epoch 1)
    return load_config(config, {"name": name, "data_dir": str(data_dir), "out_dir": str(out_dir), "epochs": 1,
                                "folds.n_splits": 5, "amp_dtype": amp_dtype, "train.compile": compiled,
                                "train.freeze_backbone_epochs": 0,
                                "model.pretrained": False, "model.pretrained_file": "", "train.swa_epochs": 0,
                                "device": device, "submissions_dir": str(out_dir / "submissions")})


def one_epoch(config: str, data_dir: Path, out_dir: Path, amp_dtype: str, compiled: bool, device: str) -> dict:
    """Fold 0 of `config` for one epoch, under sync-debug "error": its history row, or the error."""
    from .engine import train_fold

    cfg = check_config(config, data_dir, out_dir, device, amp_dtype, compiled)
    row = {"config": config, "precision": amp_dtype, "compiled": compiled}
    started = time.perf_counter()
    try:
        with sync_debug_error():
            metrics = train_fold(cfg, 0, log=lambda *_: None)
        history = pd.read_csv(fold_dir(cfg, 0) / HISTORY).iloc[-1]
        peak = history.get("peak_memory_mb")
        row.update(status="ok", train_images_per_s=float(history["images_per_s"]),
                   epoch_seconds=float(history["seconds"]), peak_memory_mb=None if pd.isna(peak) else float(peak),
                   val_auc=float(metrics["best_val_auc"]), fold_seconds=time.perf_counter() - started)
    except Exception as err:     # a failed run is reported, and the check goes on with the others
        row.update(status="FAILED", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                   where=traceback.format_exc(limit=-3))
    return row


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


SCALE_OUT_CONFIG = "baseline_bn"


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
    return {**row, "status": "ok", "train_images_per_s": float(sum(h["images_per_s"] for h in histories)),
            "epoch_seconds": float(max(h["seconds"] for h in histories))}


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


def read_rows(path: Path) -> list[dict]:
    """The rows a check wrote, finished or cut off."""
    return read_json_lines(path)


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


def estimate_seconds(plan_row: tuple[str, str, bool], finished: list[dict]) -> float:
    """What a row will take, from the rows already done (0 before the first: the first row always runs)."""
    done = [r["fold_seconds"] for r in finished if r.get("kind") == "epoch" and r.get("status") == "ok"]
    if not done:
        return 0.0
    config, _, compiled = plan_row
    base = min(done)
    return base * (5.0 if config.startswith(ONE_PRECISION) else 1.0) + (COMPILE_SECONDS if compiled else 0.0)


def run_gpu_check(out_dir: str | Path = "runs/gpu-check", images: int = 50_000, test_images: int = 2000,
                  configs=SHIPPED, compiled=COMPILED, device: str = "cuda", bench_images: int = 8192,
                  bench_seconds: float = 1.0, scale_out_processes: int | None = None, minutes: float = 7.0,
                  log=print) -> tuple[Path, bool]:
    """Every step of the module docstring within `minutes`; returns the summary JSON's path and whether every run
    that ran passed. Rows run in the order of their value (`planned_epochs`, then bench, TTA, scale-out); one that
    would not fit in the time left is recorded as skipped. `device="cpu"` runs the same steps on the CPU (the
    tests use it, small). `scale_out_processes`: the processes of step 4 (default: the GPU count; skipped below
    2)."""
    from .bench import run_bench

    if device == "cuda" and not torch.cuda.is_available():
        raise KitError("make gpu-check needs a GPU, and PyTorch sees none here (torch.cuda.is_available() is False); "
                       "run it on a GPU machine, e.g. a Kaggle notebook with a T4 or L4, or pass --device cpu")
    torch_device = select_device(device)          # refuses a card this torch has no kernels for
    card = card_name(torch_device) if torch_device.type == "cuda" else "cpu"
    auto = autocast_dtype(torch_device, amp=True)
    precisions = ["auto"] + (["fp16"] if auto == torch.bfloat16 else [])     # a bf16 card also runs a T4's fp16
    stamp = time.strftime("%Y%m%d-%H%M%S")
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

    with tempfile.TemporaryDirectory(prefix="kit-gpu-check-") as tmp:
        data_dir = timing_data(Path(tmp), images, test=test_images)
        log(f"1/4 one epoch per config on {images:,} generated patches (sync debug: error), backbones unfrozen …")
        for plan_row in planned_epochs(configs, precisions, compiled):
            config, precision, is_compiled = plan_row
            if not first_epoch_pending() and not fits(estimate_seconds(plan_row, rows.rows)):
                rows.add("epoch", {"config": config, "precision": precision, "compiled": is_compiled,
                                   "status": "skipped", "error": "time budget"},
                         f"  {config:<14} {precision:<5} skipped: would not fit in the time left")
                continue
            row = one_epoch(config, data_dir, Path(tmp) / "runs", precision, is_compiled, device)
            rows.add("epoch", row, format_run(row))
        log("2/4 make bench …")
        if fits(30.0):
            rows.add("bench", {"status": "ok", **run_bench(images=bench_images, device=device,
                                                           batch_size=min(256, bench_images),
                                                           min_seconds=bench_seconds, log=log)})
        log("3/4 TTA prediction of the test set …")
        tta_config = DEFAULT_CONFIG if DEFAULT_CONFIG in configs else list(configs)[0]
        if fits(10.0):
            rows.add("tta", tta_prediction(tta_config, data_dir, Path(tmp) / "runs", device))
        processes = torch.cuda.device_count() if scale_out_processes is None else scale_out_processes
        if processes >= 2 and fits(60.0):
            log(f"4/4 scale-out: {SCALE_OUT_CONFIG} on {processes} processes, DDP and fold-parallel …")
            for row in scale_out(SCALE_OUT_CONFIG, data_dir, Path(tmp) / "runs", processes, device):
                rows.add("scale_out", row)
    report = summary(read_rows(rows.path))
    report["seconds"] = time.monotonic() - started
    path = rows.path.with_suffix(".json")
    atomic_write_json(path, report)
    log("\n" + format_report(report))
    return path, report["passed"]


def summary(rows: list[dict]) -> dict:
    """The report (card, epochs, bench, TTA, scale-out, passed) rebuilt from a check's rows, finished or cut off."""
    header = next((r for r in rows if r["kind"] == "header"), {})
    report = {key: value for key, value in header.items() if key != "kind"}
    report["epochs"] = [r for r in rows if r["kind"] == "epoch"]
    report["bench"] = next((r for r in rows if r["kind"] == "bench"), None)
    report["tta"] = next((r for r in rows if r["kind"] == "tta"), None)
    report["scale_out"] = [r for r in rows if r["kind"] == "scale_out"]
    ran = report["epochs"] + report["scale_out"] + [r for r in (report["tta"],) if r]
    report["passed"] = all(r["status"] in ("ok", "skipped") for r in ran) and \
        any(r["status"] == "ok" for r in report["epochs"])
    return report


def format_run(row: dict) -> str:
    what = f"{row['config']:<14} {row['precision']:<5} {'compiled' if row['compiled'] else 'eager':<9}"
    if row["status"] == "skipped":
        return f"  {what} skipped ({row['error']})"
    if row["status"] != "ok":
        return f"  {what} FAILED: {row['error']}"
    peak = row.get("peak_memory_mb")
    peak = f"{peak:>9,.0f}" if peak is not None else f"{'-':>9}"
    return (f"  {what} {row['train_images_per_s']:>10,.0f} {row['epoch_seconds']:>8.1f} {peak} "
            f"{row['val_auc']:>8.4f}")


def format_report(report: dict) -> str:
    from .bench import format_table

    took = f"{report['seconds'] / 60:.1f} min" if "seconds" in report else "cut off before its end"
    lines = [f"{report['card']}; torch {report['torch']} (CUDA {report['cuda']}); kit precision "
             f"{report['kit_precision']}; {report['images']:,} patches; {took}", "",
             format_table(report["bench"]) if report.get("bench") else "  bench: not run (time budget)", "",
             f"  {'config':<14} {'prec.':<5} {'mode':<9} {'train img/s':>10} {'epoch s':>8} {'peak MB':>9} "
             f"{'val AUC':>8}", "  " + "-" * 70]
    lines += [format_run(row) for row in report["epochs"]]
    tta = report.get("tta")
    lines += ["", f"  TTA prediction ({tta['config']}): " + (
        f"{tta['images_per_s']:,.0f} test images/s × {tta['views']} views" if tta["status"] == "ok"
        else f"FAILED: {tta['error']}") if tta else "  TTA prediction: not run (time budget)"]
    single = next((r for r in report["epochs"] if r["config"] == SCALE_OUT_CONFIG and r["precision"] == "auto"
                   and not r["compiled"] and r["status"] == "ok"), None)
    for row in report.get("scale_out", []):
        if row["status"] != "ok":
            lines.append(f"  {row['config']} {row['mode']}: FAILED: {row['error']}")
            continue
        versus = f" ({row['train_images_per_s'] / single['train_images_per_s']:.2f}× one process)" if single else ""
        lines.append(f"  {row['config']} {row['mode']}: {row['train_images_per_s']:,.0f} train images/s{versus}, "
                     f"epoch {row['epoch_seconds']:.1f} s")
    lines += ["", "passed" if report["passed"] else "FAILED: see the rows above"]
    return "\n".join(lines)
