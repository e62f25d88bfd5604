"""What must hold on a GPU, checked on the card at hand: each check trains or predicts on a small generated set and
raises AssertionError (naming the number) when the GPU path does not do what the CPU tests prove of it.

The same functions run as `make gpu-check`'s correctness rows (no pytest needed on a bare box) and as the `gpu`
tests (tests/test_gpu.py, skipped where CUDA is absent):

  trains_and_resumes    a fold in the card's precision under sync debug "error", interrupted after epoch 1 and resumed,
                        against the same fold trained straight through
  fp16_loss_scaling     forced fp16 autocast (a T4's precision) with its GradScaler: finite loss, a live scale
  tta_matches_cpu       the test set's TTA probabilities from one fold on the GPU against the same weights on the CPU
  ddp_two_processes     one fold as DDP over 2 GPUs (NCCL): both ranks' images counted, the fold finished
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import CONFIGS_DIR, Config, load_config, save_config
from .device import autocast_dtype, precision_name, select_device, sync_debug_error
from .runs import LAST, fold_dir, load_checkpoint

CHECK_IMAGES, CHECK_TEST_IMAGES = 600, 48     # the generated set: a fold trains in seconds on any GPU


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
    ends where the same fold trained straight through ends (to rounding: cuDNN's kernels are not bit-exact)."""
    from .engine import train_fold

    resumed = small_config(data_dir, out_dir, device, "resumed")
    straight = small_config(data_dir, out_dir, device, "straight")

    def stop_after_epoch_1(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with sync_debug_error():
        try:
            train_fold(resumed, 0, on_epoch_end=stop_after_epoch_1, log=quiet)
            raise AssertionError("the fold went on past the interruption after epoch 1")
        except KeyboardInterrupt:
            pass
        first_epoch = load_checkpoint(fold_dir(resumed, 0) / LAST)["history"]
        metrics = train_fold(resumed, 0, log=quiet)
        reference = train_fold(straight, 0, log=quiet)
    state = load_checkpoint(fold_dir(resumed, 0) / LAST)
    expected = precision_name(autocast_dtype(select_device(device), resumed.amp, resumed.amp_dtype))
    assert state["amp_dtype"] == expected, f"trained in {state['amp_dtype']}, the card's precision is {expected}"
    assert metrics["epochs_trained"] == 2 and state["history"][:1] == first_epoch, \
        "the resumed fold did not keep epoch 1 and train epoch 2"
    gap = abs(metrics["best_val_auc"] - reference["best_val_auc"])
    assert gap <= 0.02, (f"resumed val AUC {metrics['best_val_auc']:.4f} vs straight-through "
                         f"{reference['best_val_auc']:.4f}: {gap:.4f} apart (more than rounding)")
    return {"precision": expected, "val_auc": metrics["best_val_auc"], "straight_val_auc": reference["best_val_auc"]}


def fp16_loss_scaling(data_dir: Path, out_dir: Path, device: str) -> dict:
    """One epoch in forced fp16 autocast, as a T4 runs it: the loss stays finite and the GradScaler's scale is live
    (positive, finite) in the checkpoint that a resume would read."""
    from .engine import train_fold

    cfg = small_config(data_dir, out_dir, device, "fp16", epochs=1, amp_dtype="fp16")
    metrics = train_fold(cfg, 0, log=quiet)
    state = load_checkpoint(fold_dir(cfg, 0) / LAST)
    scale = state["scaler"].get("scale")
    scale = float(scale) if scale is not None else None
    assert state["amp_dtype"] == precision_name(autocast_dtype(select_device(device), True, "fp16")), state["amp_dtype"]
    assert all(math.isfinite(row["train_loss"]) for row in state["history"]), "fp16 training loss is not finite"
    if select_device(device).type == "cuda":
        assert scale is not None and math.isfinite(scale) and scale > 0, f"GradScaler scale {scale}"
    return {"val_auc": metrics["best_val_auc"], "loss_scale": scale}


def tta_matches_cpu(data_dir: Path, out_dir: Path, device: str) -> dict:
    """The same fold's TTA probabilities on the test set, from `device` and from the CPU: in fp32 within 5e-3 (TF32
    convolutions), in the card's precision within 5e-2 (bf16 has 8 bits of mantissa)."""
    from .engine import train_fold
    from .predict import predict_test

    cfg = small_config(data_dir, out_dir, device, "tta", epochs=1, **{"folds.n_splits": 2})
    train_fold(cfg, 0, log=quiet)
    on_cpu = predict_test(replace(cfg, device="cpu", amp=False), allow_missing_folds=True, log=quiet)
    in_fp32 = predict_test(replace(cfg, amp=False), allow_missing_folds=True, log=quiet)
    in_precision = predict_test(cfg, allow_missing_folds=True, log=quiet)
    assert on_cpu.ids == in_fp32.ids == in_precision.ids
    fp32_gap = float(np.abs(in_fp32.probabilities - on_cpu.probabilities).max())
    precision_gap = float(np.abs(in_precision.probabilities - on_cpu.probabilities).max())
    assert fp32_gap <= 5e-3, f"fp32 TTA probabilities differ from the CPU's by up to {fp32_gap:.2e}"
    assert precision_gap <= 5e-2, f"TTA probabilities in the card's precision differ from the CPU's by {precision_gap:.2e}"
    return {"views": on_cpu.views, "fp32_max_difference": fp32_gap, "precision_max_difference": precision_gap}


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
    assert done.returncode == 0, f"DDP over 2 processes exited {done.returncode}: {lines[-1]}"
    metrics = json.loads((fold_dir(cfg, 0) / METRICS).read_text())
    assert metrics["processes"] == 2, f"metrics.json counts {metrics['processes']} processes"
    return {"processes": 2, "val_auc": metrics["best_val_auc"]}


CHECKS = {"trains and resumes under sync debug": trains_and_resumes,
          "fp16 with loss scaling": fp16_loss_scaling,
          "TTA matches the CPU": tta_matches_cpu,
          "DDP over 2 processes": ddp_two_processes}
NEEDS_TWO_GPUS = {"DDP over 2 processes"}
