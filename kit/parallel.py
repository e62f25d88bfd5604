"""Fold-parallel training: `make train-all PARALLEL=N` trains N folds at once, one process per fold.

Folds are independent and each writes only its own run folder (behind its lock), so the first win on a machine with
several GPUs (Kaggle's T4 ×2) or many cores is running them side by side. The parent builds what folds share (the
fold file and the train cache) once, before any worker starts; then it hands out folds from a queue of unfinished
ones, one worker process per slot: a GPU each (`CUDA_VISIBLE_DEVICES`), or on the CPU an equal share of the cores.
Each worker is the ordinary `python -m kit train --fold k`, logging to runs/<exp>/fold<k>.log; the parent prints
their epoch lines prefixed with the fold. A failed fold is named with the end of its log (and the signal, when one
killed it) while the others finish; Ctrl-C stops every worker, and each fold resumes later from its last saved
epoch. Workers die with their parent, however it dies (PR_SET_PDEATHSIG on Linux, a watchdog elsewhere), and one
parent runs per experiment at a time (train-all.lock). On GPUs each worker gets one of the parent's own visible
GPUs (its CUDA_VISIBLE_DEVICES, when set).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, save_config
from .errors import Interrupted, KitError, killed_by
from .experiment import folds_to_train
from .fold_data import prepare_shared
from .io import process_lock
from .progress import FoldsBar, say
from .runs import experiment_dir, fold_log_path, parallel_config_path

SHOWN = ("epoch ", ": done", "already trained", "resuming", "warning", "error")   # log lines the parent echoes
LOG_TAIL = 3          # lines of a failed fold's log in the error


def resolve_parallel(parallel) -> int:
    """`auto`: one worker per visible GPU (1 on a CPU machine); else a positive whole number."""
    if str(parallel).strip().lower() == "auto":
        return max(1, torch.cuda.device_count())
    try:
        count = int(parallel)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise KitError(f"PARALLEL must be a positive whole number or auto, got {parallel!r}")
    return count


@dataclass
class Worker:
    fold: int
    slot: int
    process: subprocess.Popen
    log_path: Path
    read: int = 0                            # bytes of the log already echoed
    tail: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


def kit_process_environment() -> dict:
    """The environment of a `python -m kit …` child: it imports the kit this process runs (a notebook may have it on
    sys.path only, from a read-only input), unbuffered, without progress bars."""
    kit_home = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(p for p in (kit_home, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", PYTHONPATH=python_path)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices, or GPU-/MIG- UUIDs): the parent's
    own list when it has one (`CUDA_VISIBLE_DEVICES=2,3 make train-all PARALLEL=2` → GPUs 2 and 3), else 0..N-1."""
    listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    count = torch.cuda.device_count()
    return listed[:count] if listed else [str(index) for index in range(count)]


def slot_environment(slot: int, workers: int) -> dict:
    """A GPU of its own (one of the parent's visible GPUs), or on the CPU an equal share of the cores (torch sizes
    its thread pool from these)."""
    env = dict(kit_process_environment(), KIT_PARENT_PID=str(os.getpid()))
    if torch.cuda.is_available():
        gpus = visible_gpus()
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    else:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def train_folds_parallel(cfg: Config, parallel, force: bool = False, log=say) -> list[int]:
    """Train the experiment's unfinished folds (all with `force`), `parallel` at a time; return the folds trained.
    Raises KitError naming each failed fold with the end of its log, once the others have finished."""
    workers_wanted = resolve_parallel(parallel)
    pending = folds_to_train(cfg, force)
    if not pending:
        log(f"{cfg.name}: every fold is trained; pass FORCE=1 to train them again")
        return []
    with parallel_lock(cfg):
        return run_workers(cfg, pending, workers_wanted, force, log)


def parallel_lock(cfg: Config):
    """One fold-parallel `train-all` per experiment at a time: a second would echo the first's fold logs as its
    own. The OS drops the lock when the parent dies, however it dies."""
    return process_lock(experiment_dir(cfg) / "train-all.lock",
                        f"`make train-all PARALLEL=…` of `{cfg.name}` is already running ({{holder}}, {{path}}); "
                        f"wait for it to end or stop it, then rerun")


def run_workers(cfg: Config, pending: list[int], workers_wanted: int, force: bool, log) -> list[int]:
    prepare_shared(cfg, log)
    config_path = parallel_config_path(cfg)       # the effective config, overrides included, for the workers
    save_config(cfg, config_path)
    workers = min(workers_wanted, len(pending))
    where = (f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available()
             else f"the CPU, {max(1, (os.cpu_count() or 1) // workers)} thread(s) each")
    log(f"{cfg.name}: training folds {', '.join(map(str, pending))}, {workers} at a time on {where}; "
        f"logs in {experiment_dir(cfg)}/fold<k>.log")
    queue, running, failed = list(pending), [], {}
    bar = FoldsBar(cfg.name, cfg.folds.n_splits, len(pending), workers)    # each worker's log: its fold's estimate
    try:
        while queue or running:
            free = sorted(set(range(workers)) - {w.slot for w in running})
            while queue and free:
                running.append(start_worker(cfg, queue.pop(0), free.pop(0), workers, config_path, force))
            time.sleep(0.5)
            for worker in list(running):
                echo_new_lines(worker, log)
                if worker.process.poll() is not None:
                    echo_new_lines(worker, log)
                    running.remove(worker)
                    if worker.process.returncode != 0:
                        failed[worker.fold] = worker.tail[-LOG_TAIL:] + [exit_reason(worker.process.returncode)]
                    else:
                        bar.fold_done(time.monotonic() - worker.started)
    except KeyboardInterrupt:
        stop_workers(running)
        raise Interrupted(f"interrupted: folds {', '.join(str(w.fold) for w in running) or 'none'} stopped; every "
                          f"fold keeps its finished epochs; rerun the same command to resume") from None
    finally:
        bar.close()
    if failed:
        raise KitError("; ".join(f"fold {fold} failed ({experiment_dir(cfg)}/fold{fold}.log ends: "
                                 f"{' | '.join(tail)})" for fold, tail in failed.items())
                       + "; the other folds are saved: fix the cause and rerun the same command (finished folds are "
                         "skipped, stopped ones resume)")
    return pending


def exit_reason(returncode: int) -> str:
    """How a worker ended, in words: killed by a signal, or its exit status."""
    killed = killed_by(returncode)
    return f"the worker was {killed}" if killed else f"exit status {returncode}"


def die_with_parent() -> None:
    """A worker's preexec_fn: Linux sends it SIGINT when the parent dies (even by kill -9), so it stops as Ctrl-C
    stops it, keeping its saved epochs, instead of training on with no one to wait for it and holding its fold's
    lock. Elsewhere the worker's own watchdog does the same (`kit.cli`, KIT_PARENT_PID)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if os.getppid() == 1:              # the parent died before prctl: stop now
        os._exit(130)


def start_worker(cfg: Config, fold: int, slot: int, workers: int, config_path: Path, force: bool) -> Worker:
    log_path = fold_log_path(cfg, fold)
    with open(log_path, "ab") as log_file:      # appended: earlier runs' lines stay; the child has its own handle
        start = log_file.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "kit", "train", "--fold", str(fold), "--config", str(config_path)]
            + (["--force"] if force else []),
            stdout=log_file, stderr=subprocess.STDOUT, env=slot_environment(slot, workers),
            preexec_fn=die_with_parent)
    return Worker(fold, slot, process, log_path, read=start)


def echo_new_lines(worker: Worker, log) -> None:
    """The worker's new complete log lines: kept for the error tail, the informative ones echoed."""
    with open(worker.log_path, "rb") as handle:
        handle.seek(worker.read)
        chunk = handle.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    worker.read += len(complete)
    for line in complete.decode(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        worker.tail = (worker.tail + [line])[-LOG_TAIL:]
        if any(marker in line for marker in SHOWN):
            log(f"[fold {worker.fold}] {line}")


def stop_workers(running: list[Worker], grace_seconds: float = 60.0) -> None:
    """Stop every worker as Ctrl-C would (each keeps its saved epochs and exits), then wait; kill what does not
    stop. A terminal's Ctrl-C has reached them already (one process group): they get a moment to end on their own
    before being sent one (a notebook's interrupt reaches only this process)."""
    deadline = time.monotonic() + 2.0
    while any(w.process.poll() is None for w in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in running:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_seconds
    for worker in running:
        try:
            worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
