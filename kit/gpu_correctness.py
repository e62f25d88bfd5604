"""What must hold on a GPU, checked on the card at hand: each check trains or predicts on a small generated set and
raises CheckFailed (naming the number) when the GPU path does not do what the CPU tests prove of it. The checks
raise it themselves instead of asserting: `python -O` strips asserts, and every row would then read ok.

The same functions run as `make gpu-check`'s correctness rows (no pytest needed on a bare box) and as the `gpu`
tests (tests/test_gpu.py, skipped where CUDA is absent):

  trains_and_resumes    a fold in the card's precision under sync debug "error", interrupted after epoch 1 and resumed,
                        against the same fold trained straight through: the same weights, bit for bit (both run
                        on deterministic kernels)
  fp16_loss_scaling     forced fp16 autocast (a T4's precision) with its GradScaler: finite loss, a live scale
  tta_matches_cpu       the test set's TTA probabilities from one fold on the GPU against the same weights on the CPU
  ddp_two_processes     one fold as DDP over 2 GPUs (NCCL): both ranks' images counted, the fold finished
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checkpoints import load_checkpoint
from .config import CONFIGS_DIR, Config, load_config, save_config
from .device import autocast_dtype, precision_name, select_device, sync_debug_error
from .runs import LAST, fold_dir

CHECK_IMAGES, CHECK_TEST_IMAGES = 600, 48     # the generated set: a fold trains in seconds on any GPU
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")     # the workspace settings under which cuBLAS repeats its sums exactly


class CheckFailed(AssertionError):
    """A check that does not hold on this card. Raised, not asserted, so that `python -O` keeps it."""


def require(holds: bool, message: str) -> None:
    if not holds:
        raise CheckFailed(message)


@contextmanager
def deterministic_kernels():
    """Inside, torch's ops, cuDNN and cuBLAS run their deterministic kernels only, so that the same steps give the
    same weights bit for bit (cuDNN's fastest kernels sum in an order that varies from run to run); the settings
    before are restored after."""
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if before[3] not in DETERMINISTIC_CUBLAS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[3]


def same_weights(resumed: dict, straight: dict) -> None:
    """Two state dicts hold the same tensors, bit for bit; else CheckFailed naming the first that differs."""
    import torch

    require(resumed.keys() == straight.keys(), f"the resumed model has other tensors: "
                                               f"{sorted(set(resumed) ^ set(straight))[:3]}")
    for name, tensor in straight.items():
        if not torch.equal(resumed[name], tensor):
            gap = (resumed[name].double() - tensor.double()).abs().max().item()
            raise CheckFailed(f"the resumed fold's `{name}` differs from the straight-through fold's by up to "
                              f"{gap:.3g} (the same steps on deterministic kernels must give the same weights)")


def small_config(data_dir: Path, out_dir: Path, device: str, name: str, **overrides) -> Config:
    """configs/demo.yaml (baseline_bn, D4) on the generated set: 2 folds × 2 epochs, 2 TTA views."""
    values = {"name": name, "data_dir": str(data_dir), "out_dir": str(out_dir), "device": device,
              "submissions_dir": str(out_dir / "submissions"), "epochs": 2, "batch_size": 32,
              "folds.n_splits": 2, "eval_batch_size": 128, "tta.views": "hflip"}
    return load_config(CONFIGS_DIR / "demo.yaml", {**values, **overrides})


def quiet(*_) -> None:
    pass


def trains_and_resumes(data_dir: Path, out_dir: Path, device: str) -> dict:
    """Fold 0 in the card's own precision under sync debug "error", stopped after epoch 1 and resumed from last.pt,
    ends with the weights of the same fold trained straight through, bit for bit (on deterministic kernels)."""
    from .fold import train_fold

    resumed = small_config(data_dir, out_dir, device, "resumed")
    straight = small_config(data_dir, out_dir, device, "straight")

    def stop_after_epoch_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with sync_debug_error(), deterministic_kernels():
        try:
            train_fold(resumed, 0, on_epoch_end=stop_after_epoch_1, log=quiet)
            raise CheckFailed("the fold went on past the interruption after epoch 1")
        except KeyboardInterrupt:
            pass
        first_epoch = load_checkpoint(fold_dir(resumed, 0) / LAST)["history"]
        metrics = train_fold(resumed, 0, log=quiet)
        reference = train_fold(straight, 0, log=quiet)
    state = load_checkpoint(fold_dir(resumed, 0) / LAST)
    expected = precision_name(autocast_dtype(select_device(device), resumed.amp, resumed.amp_dtype))
    require(state["amp_dtype"] == expected, f"trained in {state['amp_dtype']}, the card's precision is {expected}")
    require(metrics["epochs_trained"] == 2 and state["history"][:1] == first_epoch,
            "the resumed fold did not keep epoch 1 and train epoch 2")
    same_weights(state["model"], load_checkpoint(fold_dir(straight, 0) / LAST)["model"])
    return {"precision": expected, "val_auc": metrics["best_val_auc"], "straight_val_auc": reference["best_val_auc"],
            "identical_tensors": len(state["model"])}


def fp16_loss_scaling(data_dir: Path, out_dir: Path, device: str) -> dict:
    """One epoch in forced fp16 autocast, as a T4 runs it: the loss stays finite and the GradScaler's scale is live
    (positive, finite) in the checkpoint that a resume would read."""
    from .fold import train_fold

    cfg = small_config(data_dir, out_dir, device, "fp16", epochs=1, amp_dtype="fp16")
    metrics = train_fold(cfg, 0, log=quiet)
    state = load_checkpoint(fold_dir(cfg, 0) / LAST)
    scale = state["scaler"].get("scale")
    scale = float(scale) if scale is not None else None
    expected = precision_name(autocast_dtype(select_device(device), True, "fp16"))
    require(state["amp_dtype"] == expected, f"trained in {state['amp_dtype']}, forced fp16 is {expected} here")
    require(all(math.isfinite(row["train_loss"]) for row in state["history"]), "fp16 training loss is not finite")
    if select_device(device).type == "cuda":
        require(scale is not None and math.isfinite(scale) and scale > 0, f"GradScaler scale {scale}")
    return {"val_auc": metrics["best_val_auc"], "loss_scale": scale}


def tta_matches_cpu(data_dir: Path, out_dir: Path, device: str) -> dict:
    """The same fold's TTA probabilities on the test set, from `device` and from the CPU: in fp32 within 5e-3 (TF32
    convolutions), in the card's precision within 5e-2 (bf16 has 8 bits of mantissa)."""
    from .fold import train_fold
    from .predict import predict_test

    cfg = small_config(data_dir, out_dir, device, "tta", epochs=1, **{"folds.n_splits": 2})
    train_fold(cfg, 0, log=quiet)
    on_cpu = predict_test(replace(cfg, device="cpu", amp=False), allow_missing_folds=True, log=quiet)
    in_fp32 = predict_test(replace(cfg, amp=False), allow_missing_folds=True, log=quiet)
    in_precision = predict_test(cfg, allow_missing_folds=True, log=quiet)
    require(on_cpu.ids == in_fp32.ids == in_precision.ids, "the predictions cover other test ids on the GPU")
    fp32_gap, precision_gap = tta_gaps(on_cpu.probabilities, in_fp32.probabilities, in_precision.probabilities)
    return {"views": on_cpu.views, "fp32_max_difference": fp32_gap, "precision_max_difference": precision_gap}


def tta_gaps(on_cpu: np.ndarray, in_fp32: np.ndarray, in_precision: np.ndarray) -> tuple[float, float]:
    """The largest differences of the GPU's probabilities from the CPU's, in fp32 and in the card's precision;
    CheckFailed when either is above its bound."""
    fp32_gap = float(np.abs(in_fp32 - on_cpu).max())
    precision_gap = float(np.abs(in_precision - on_cpu).max())
    require(fp32_gap <= 5e-3, f"fp32 TTA probabilities differ from the CPU's by up to {fp32_gap:.2e}")
    require(precision_gap <= 5e-2, f"TTA probabilities in the card's precision differ from the CPU's by "
                                   f"{precision_gap:.2e}")
    return fp32_gap, precision_gap


def ddp_two_processes(data_dir: Path, out_dir: Path, device: str) -> dict:
    """Fold 0 as DDP over 2 processes (NCCL on GPUs, gloo on the CPU) through the kit's launcher: it finishes, and
    its metrics count both processes."""
    import json

    from .parallel import kit_process_environment
    from .runs import METRICS

    cfg = small_config(data_dir, out_dir, device, "ddp2", epochs=1, **{"tta.views": "none"})
    config_path = out_dir / "ddp2.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_path)
    done = subprocess.run([sys.executable, "-m", "kit.launch", "--nproc_per_node", "2", "-m", "kit", "train",
                           "--fold", "0", "--config", str(config_path)], capture_output=True, text=True,
                          env=kit_process_environment(), timeout=600)
    lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
    require(done.returncode == 0, f"DDP over 2 processes exited {done.returncode}: {lines[-1]}")
    metrics = json.loads((fold_dir(cfg, 0) / METRICS).read_text())
    require(metrics["processes"] == 2, f"metrics.json counts {metrics['processes']} processes")
    return {"processes": 2, "val_auc": metrics["best_val_auc"]}


CHECKS = {"trains and resumes under sync debug": trains_and_resumes,
          "fp16 with loss scaling": fp16_loss_scaling,
          "TTA matches the CPU": tta_matches_cpu,
          "DDP over 2 processes": ddp_two_processes}
NEEDS_TWO_GPUS = {"DDP over 2 processes"}
