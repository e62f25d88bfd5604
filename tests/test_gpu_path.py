"""The GPU decisions, tested on the CPU (CI has no GPU): precision by the card's capability, cards without kernels
refused, bf16 and fp16 (with loss scaling) through training and TTA, resume across precisions, the memory fit
check counting PyTorch's cache, freezing by a zero learning rate, and no blocking copy in the training loop."""

import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import kit.device
import kit.engine
from kit.augment import batch_equivalent, build_transform
from kit.config import Config, ModelConfig, histology_augmentation
from kit.data import CachedBatches
from kit.device import autocast_dtype, has_kernels, select_device, spare_memory
from kit.engine import train_fold
from kit.inference import predict_tta_probabilities
from kit.recipe import TrainingParts, build_loss, build_optimizer, build_scheduler, hold_backbone, train_one_epoch
from kit.errors import KitError
from kit.models import build_model, head_parameter_names
from kit.runs import LAST, fold_dir, load_checkpoint

from conftest import REPO

CPU = torch.device("cpu")
KAGGLE_TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CARDS = {(6, 0): "Tesla P100-PCIE-16GB", (7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-40GB",
         (8, 9): "NVIDIA L4", (9, 0): "NVIDIA H100 80GB HBM3"}


@pytest.fixture
def card(monkeypatch):
    """Pretend a GPU of the given compute capability is visible, under a torch built for Kaggle's archs."""
    def pretend(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: CARDS[capability])
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: KAGGLE_TORCH_ARCHS)
        return torch.device("cuda")
    return pretend


@pytest.mark.parametrize("capability, expected", [
    ((6, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
    ((9, 0), torch.bfloat16)])
def test_bf16_only_where_the_card_has_it(card, capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # emulation counts there: ignored
    device = card(capability)
    assert autocast_dtype(device, amp=True) == expected
    assert autocast_dtype(device, amp=False) is None and autocast_dtype(CPU, amp=True) is None
    assert autocast_dtype(device, amp=True, amp_dtype="fp16") == torch.float16
    if expected == torch.float16:
        with pytest.raises(KitError, match=rf"amp_dtype=bf16, but the {CARDS[capability]} \(compute capability "
                                           rf"{capability[0]}\.{capability[1]}\) has no bf16 tensor cores"):
            autocast_dtype(device, amp=True, amp_dtype="bf16")
    else:
        assert autocast_dtype(device, amp=True, amp_dtype="bf16") == torch.bfloat16


def test_a_card_without_kernels_is_refused_at_start_naming_it(card):
    card((6, 0))
    with pytest.raises(KitError) as caught:
        select_device("auto")
    assert str(caught.value).startswith("the GPU Tesla P100-PCIE-16GB (compute capability 6.0) has no kernels in "
                                        "this PyTorch build")
    assert "sm_75 sm_80" in str(caught.value) and "pick a T4 or an L4" in str(caught.value)
    card((7, 5))
    assert select_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("capability, archs, runs", [
    ((7, 5), ["sm_75"], True), ((8, 6), ["sm_80"], True),        # same major, older minor: binary compatible
    ((8, 0), ["sm_86"], False), ((6, 0), ["sm_70", "sm_75"], False), ((6, 1), ["sm_60"], True),
    ((9, 0), ["sm_80", "compute_80"], True),                      # PTX: the driver compiles it for a newer card
    ((9, 0), ["sm_90a"], True), ((12, 0), ["sm_120"], True), ((7, 0), ["compute_75"], False)])
def test_kernel_compatibility_rules(capability, archs, runs):
    assert has_kernels(capability, archs) is runs


def test_the_fit_check_counts_memory_pytorch_has_cached(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 7 * gib)    # fold 0's split, released
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    assert spare_memory(torch.device("cuda")) == 7 * gib      # 1 free + 6 cached but unused


def test_the_competition_split_is_held_on_a_card_only_with_half_its_spare_memory_left(monkeypatch):
    from kit.competition import TRAIN_IMAGES
    from kit.data import ROW_BYTES, fits_resident

    split, gib = TRAIN_IMAGES * ROW_BYTES, 2**30       # 6.1 GB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    for spare, held in [(14.5 * gib, True), (11 * gib, False)]:       # a T4's spare memory; a 12 GB card's
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, spare=spare: (int(spare), 16 * gib))
        assert fits_resident(split, torch.device("cuda")) is held
    assert not fits_resident(1, CPU)


def test_the_t4_line_comes_from_the_measured_peaks_with_the_competition_split_in_place_of_the_checks():
    from kit.gpu_check import format_report, summary

    def epoch(config, precision, peak, tta_peak, **extra):
        return {"kind": "epoch", "config": config, "precision": precision, "compiled": False, "status": "ok",
                "batch_size": 128, "train_images_per_s": 1000.0, "epoch_seconds": 40.0, "peak_memory_mb": peak,
                "tta_peak_memory_mb": tta_peak, "resident_split_mb": 1318.0, "val_auc": 0.9, **extra}

    rows = [{"kind": "header", "card": "NVIDIA H200", "torch": "2.11", "cuda": "12.8", "kit_precision": "bf16",
             "images": 50_000, "minutes": 7},
            epoch("baseline_bn", "auto", 3000.0, 2000.0), epoch("baseline_bn", "fp16", 2500.0, 2200.0),
            epoch("compete_effnet_b0", "auto", 9000.0, 4000.0),          # 9000 - 1318 + 5801 = 13,483 MB: too much
            epoch("compete_effnet_b0", "auto", 12000.0, 4000.0, swa=True, swa_bn_peak_memory_mb=3000.0)]
    fits = {fit["config"]: fit for fit in summary(rows)["t4"]}
    assert fits["baseline_bn"]["peak_mb"] == pytest.approx(2500.0 - 1318.0 + 5801.0, abs=1)    # its fp16 row
    assert fits["baseline_bn"]["fits"] and not fits["compete_effnet_b0"]["fits"]
    assert fits["compete_effnet_b0"]["peak_mb"] == pytest.approx(9000.0 - 1318.0 + 5801.0, abs=1), "not the SWA row"
    table = format_report(summary(rows))
    assert "compete_effnet_b0: fits a 16 GB T4 at batch 128: NO (peak 13,483 MB" in table
    assert "baseline_bn: fits a 16 GB T4 at batch 128: yes" in table


def test_a_compiled_row_times_its_second_epoch_and_reports_the_first_ones_extra_as_compile_seconds(tmp_path):
    import pandas as pd

    from kit.gpu_check import check_config, epoch_numbers, format_run

    assert check_config("effnet_b0", tmp_path, tmp_path, "cpu", compiled=True).epochs == 2
    assert check_config("effnet_b0", tmp_path, tmp_path, "cpu").epochs == 1
    history = pd.DataFrame({"images_per_s": [900.0, 4000.0], "seconds": [70.0, 12.0],
                            "peak_memory_mb": [5000.0, 5100.0]})
    numbers = epoch_numbers(history, compiled=True)
    assert numbers["train_images_per_s"] == 4000.0 and numbers["epoch_seconds"] == 12.0
    assert numbers["compile_seconds"] == 58.0 and numbers["peak_memory_mb"] == 5100.0
    row = {"config": "effnet_b0", "precision": "auto", "compiled": True, "status": "ok", "val_auc": 0.9, **numbers}
    assert "compile 58 s (first epoch 70.0 s)" in format_run(row)


def test_a_failed_correctness_check_is_its_row_and_fails_the_check(monkeypatch, tmp_path):
    import kit.gpu_correctness
    from kit.gpu_check import correctness, format_check, summary

    def resumes_elsewhere(data_dir, out_dir, device):
        raise AssertionError("resumed val AUC 0.61 vs straight-through 0.93: 0.32 apart (more than rounding)")

    monkeypatch.setattr(kit.gpu_correctness, "CHECKS", {"trains and resumes under sync debug": resumes_elsewhere})
    row = correctness("trains and resumes under sync debug", tmp_path, tmp_path, "cpu")
    assert row["status"] == "FAILED" and "0.32 apart" in row["error"] and "0.32 apart" in format_check(row)
    epoch = {"kind": "epoch", "config": "baseline_bn", "precision": "auto", "compiled": False, "status": "ok"}
    assert summary([epoch, {"kind": "correctness", **row}])["passed"] is False
    assert summary([epoch])["passed"] is True


def test_swa_recomputes_batchnorm_in_the_training_precision_and_times_it(quick_config, monkeypatch):
    seen = []
    real_update_bn = kit.engine.update_bn

    def recording_update_bn(loader, model, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_update_bn(loader, model, *args, **kwargs)

    monkeypatch.setattr(kit.engine, "update_bn", recording_update_bn)
    monkeypatch.setattr(kit.engine, "autocast_dtype", lambda *args: torch.bfloat16)     # as on an A100 or later
    cfg = quick_config(epochs=1, **{"train.swa_epochs": 1, "tta.views": "none"})
    metrics = train_fold(cfg, 0, log=lambda *_: None)
    assert seen == [(True, torch.bfloat16)], "update_bn runs under the training's autocast"
    assert metrics["swa_bn_seconds"] > 0 and metrics["swa_val_auc"] is not None
    assert metrics["swa_bn_peak_memory_mb"] is None and metrics["tta_peak_memory_mb"] is None     # a GPU's only


def small_training(amp_dtype, scaler_enabled, steps=4, seed=0):
    torch.manual_seed(seed)
    cfg = Config(model=ModelConfig(name="baseline_bn"))
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg, model)
    parts = TrainingParts(optimizer, build_scheduler(cfg, optimizer, steps),
                          torch.amp.GradScaler("cpu", enabled=scaler_enabled), build_loss(cfg.loss, CPU))
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(16, 3, 96, 96, generator=generator)
    labels = (images[:, 0, 40:56, 40:56].mean((1, 2)) > 0.5).float()
    batches = [(images, labels)] * steps
    return model, parts, batches


@pytest.mark.parametrize("amp_dtype, scaled", [(torch.bfloat16, False), (torch.float16, True)])
def test_mixed_precision_trains_and_predicts_with_tta_on_cpu(amp_dtype, scaled):
    model, parts, batches = small_training(amp_dtype, scaler_enabled=scaled)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _ = train_one_epoch(model, batches, parts, CPU, amp_dtype, desc=None)
    assert np.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the weights moved"
    assert bool(parts.scaler.state_dict()) is scaled, "fp16 carries a loss scale; bf16 needs none"
    images = np.random.default_rng(0).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    mixed = predict_tta_probabilities(model, images, "d4", 4, CPU, amp_dtype)
    full = predict_tta_probabilities(model, images, "d4", 4, CPU, None)
    np.testing.assert_allclose(mixed, full, atol=0.05)


@pytest.mark.parametrize("first, then", [(None, torch.float16), (torch.float16, torch.bfloat16)])
def test_resume_across_precisions(quick_config, monkeypatch, first, then):
    """A CPU or bf16 run saves the scaler as {}; fp16 resumes it with a fresh scale, and the other way round the
    saved scale is simply not needed. The precision is recorded in last.pt."""
    cfg = quick_config(epochs=2, max_train_images=64, **{"folds.n_splits": 10, "tta.views": "none"})
    monkeypatch.setattr(kit.engine, "autocast_dtype", lambda *args: first)

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=stop, log=lambda *_: None)
    saved = load_checkpoint(fold_dir(cfg, 0) / LAST)
    assert bool(saved["scaler"]) is (first == torch.float16)
    assert saved["amp_dtype"] == kit.device.precision_name(first)
    monkeypatch.setattr(kit.engine, "autocast_dtype", lambda *args: then)
    metrics = train_fold(cfg, 0, log=lambda *_: None)
    assert metrics["epochs_trained"] == 2
    assert load_checkpoint(fold_dir(cfg, 0) / LAST)["amp_dtype"] == kit.device.precision_name(then)


def test_freezing_by_a_zero_learning_rate_holds_the_backbone_and_releases_it_on_schedule():
    model, parts, batches = small_training(None, scaler_enabled=False)
    heads = head_parameter_names(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    hold_backbone(parts.optimizer, parts.scheduler, held=True)
    train_one_epoch(model, batches, parts, CPU, None, desc=None, hold_backbone_lr=True)
    for name, parameter in model.named_parameters():
        moved = not torch.equal(before[name], parameter.detach())
        assert moved is (name in heads), name
    hold_backbone(parts.optimizer, parts.scheduler, held=False)
    for group, scheduled in zip(parts.optimizer.param_groups, parts.scheduler.get_last_lr()):
        assert group["lr"] == scheduled > 0


class CopyAudit(TorchFunctionMode):
    """Records every device copy that would block (`Tensor.to` naming a device without non_blocking=True,
    `Tensor.cuda`) and where the loop reads a value back into Python (`item`, `tolist`)."""

    def __init__(self):
        super().__init__()
        self.blocking, self.reads = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            names_device = func is torch.Tensor.cuda or "device" in kwargs or any(
                isinstance(a, (torch.device, str)) for a in args[1:])
            if names_device and not kwargs.get("non_blocking", False):
                caller = traceback.extract_stack()[-2]
                self.blocking.append(f"{func.__name__} at {Path(caller.filename).name}:{caller.lineno}")
        if func in (torch.Tensor.item, torch.Tensor.tolist):
            caller = traceback.extract_stack()[-2]
            self.reads.append(f"{Path(caller.filename).name}:{func.__name__}")
        return func(*args, **kwargs)


def test_the_training_loop_makes_no_blocking_copy_and_reads_the_loss_only_at_checks(demo_data):
    """The default augmentation (D4, affine, brightness/contrast, HSV) on the fast path, through an epoch: every
    host→device copy must be non-blocking, and the only read back is the loss every `check_every` steps.
    (On a GPU, `make gpu-check` runs the same loop under torch.cuda.set_sync_debug_mode("error").)"""
    from kit.data import load_split_images, read_train_labels

    ids = read_train_labels(demo_data)["id"]
    images = load_split_images(demo_data, "train", ids, demo_data.parent / "audit-cache", progress=False)
    augment = batch_equivalent(build_transform(histology_augmentation(), "augment.train"), "augment.train")
    rows = np.arange(256)
    batches = CachedBatches(images, rows, (rows % 2).astype(np.float32), 32, CPU, augment)
    batches.set_seed(3)
    model, parts, _ = small_training(None, scaler_enabled=False, steps=len(batches))
    audit = CopyAudit()
    with audit:
        train_one_epoch(model, batches, parts, CPU, None, desc=None, check_every=4)
    assert audit.blocking == [], f"blocking copies in the training loop: {audit.blocking}"
    # the loss at each check and once at the end; nothing else of the loop's own (the CPU optimizer's step
    # counters are CPU tensors, and the fused CUDA optimizers keep them on the device; the D4 group sizes are
    # counted on the CPU draws, before anything goes to the device)
    assert audit.reads.count("recipe.py:item") == len(batches) // 4 + 1, audit.reads
    assert {read for read in audit.reads if not read.startswith(("optimizer.py", "recipe.py"))} <= \
        {"augment.py:tolist"}, audit.reads


def test_gpu_check_without_a_gpu_is_one_line_and_exit_2(capsys):
    from kit.cli import main

    assert main(["gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "make gpu-check needs a GPU, and PyTorch sees none here" in err


def test_gpu_check_runs_every_step_end_to_end(tmp_path):
    """The same script on the CPU, small: bench, an epoch under the sync-debug switch, TTA, scale-out on two
    processes (DDP over gloo, two folds at once), the JSON and the table (on a GPU the same code adds forced fp16,
    compile and peak memory)."""
    import json

    from kit.gpu_check import run_gpu_check

    from kit.gpu_check import read_rows

    lines = []
    path, passed = run_gpu_check(tmp_path / "check", images=600, test_images=48, configs=("baseline_bn",), compiled=(),
                                 device="cpu", bench_images=64, bench_seconds=0.0, scale_out_processes=2,
                                 log=lines.append)
    report = json.loads(path.read_text())
    rows = read_rows(path.with_suffix(".jsonl"))           # every row, as it finished
    assert [row["kind"] for row in rows] == ["header", "resident", "epoch", "epoch", "tta", "bench", "scale_out",
                                             "scale_out"]
    assert passed and report["passed"] and report["card"] == "cpu"
    assert report["resident"]["status"] == "skipped" and report["resident"]["images"] == 220_025
    run, swa = report["epochs"]
    assert run["status"] == "ok" and run["precision"] == "auto" and run["train_images_per_s"] > 0
    assert run["peak_memory_mb"] is None and 0 <= run["val_auc"] <= 1 and run["batch_size"] == 32
    assert swa["status"] == "ok" and swa["swa"] and swa["swa_bn_seconds"] > 0, "SWA's BatchNorm pass is timed"
    assert report["correctness"] == [], "the correctness checks are a GPU's (make test proves the CPU path)"
    assert report["tta"]["status"] == "ok" and report["tta"]["views"] == "d4"
    assert "epoch (input + step + EMA) baseline" in report["bench"]["results"]
    assert [row["mode"] for row in report["scale_out"]] == ["DDP × 2", "2 folds at once"]
    assert all(row["status"] == "ok" and row["train_images_per_s"] > 0 for row in report["scale_out"])
    assert lines[-1].endswith("passed") and "train img/s" in lines[-1] and "× one process" in lines[-1]


def test_gpu_check_plans_rows_by_value_within_its_budget_and_a_cut_off_run_keeps_its_rows(tmp_path, capsys):
    import json
    import signal
    import time

    from kit.gpu_check import planned_epochs, read_rows, run_gpu_check

    plan = planned_epochs(("baseline", "baseline_bn", "compete_effnet_b0", "effnet_b0"), ["auto", "fp16"],
                          ("baseline_bn", "effnet_b0"))
    assert plan == [("baseline_bn", "auto", False), ("baseline_bn", "fp16", False), ("compete_effnet_b0", "auto", False),
                    ("baseline", "auto", False), ("baseline", "fp16", False), ("effnet_b0", "auto", False),
                    ("effnet_b0", "fp16", False), ("baseline_bn", "auto", True), ("effnet_b0", "auto", True)]

    # a budget that the first row already spends: the first row runs, every later one is recorded as skipped
    path, passed = run_gpu_check(tmp_path / "budget", images=300, test_images=20, configs=("baseline_bn", "baseline"),
                                 compiled=(), device="cpu", bench_images=64, bench_seconds=0.0, minutes=0.001,
                                 log=lambda *_: None)
    report = json.loads(path.read_text())
    assert [row["status"] for row in report["epochs"]] == ["ok", "skipped", "skipped"] and passed
    assert report["epochs"][-1]["swa"]
    assert report["bench"] is None and report["tta"] is None

    # killed mid-way (as a time limit would): the rows it finished are on disk, and --rows prints their table
    out = tmp_path / "killed"
    check = subprocess.Popen([sys.executable, "-m", "kit", "gpu-check", "--device", "cpu", "--quick", "--images",
                              "300", "--configs", "baseline_bn baseline", "--out", str(out)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, TQDM_DISABLE="1"))
    deadline = time.monotonic() + 240
    while not any(row["kind"] == "epoch" for rows in map(read_rows, out.glob("*.jsonl")) for row in rows):
        assert time.monotonic() < deadline and check.poll() is None, check.stdout.read() if check.poll() else ""
        time.sleep(0.2)
    check.send_signal(signal.SIGKILL)
    check.wait()
    (rows_file,) = out.glob("*.jsonl")
    kinds = [row["kind"] for row in read_rows(rows_file)]
    assert kinds[:3] == ["header", "resident", "epoch"] and not list(out.glob("*.json"))
    from kit.cli import main

    assert main(["gpu-check", "--rows", str(rows_file)]) == 0
    table = capsys.readouterr().out
    assert "cut off before its end" in table and "baseline_bn" in table


def test_a_compiled_fold_trains_with_ema_and_a_partial_batch_and_the_unfreeze_compiles_nothing(quick_config,
                                                                                                 monkeypatch):
    """train.compile on the CPU: a frozen first epoch held by a zero learning rate, then the unfreeze; EMA; 40
    training images in batches of 32, so every epoch ends on a partial batch of 8. torch.compile runs as it does on
    a GPU (dynamo's graph capture and guards, AOT autograd) with eager kernels in place of inductor's generated code
    (which costs 48 s more on 2 cores): whether a change recompiles is decided before that backend."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    compiled_in_epoch, epoch_now = [], [1]

    def counting_compiler(graph, example_inputs):
        compiled_in_epoch.append(epoch_now[0])
        return make_boxed_func(graph.forward)

    real_compile = torch.compile
    backend = aot_autograd(fw_compiler=counting_compiler)
    monkeypatch.setattr(torch, "compile", lambda model, **options: real_compile(model, backend=backend))
    torch._dynamo.reset()
    cfg = quick_config(epochs=2, max_train_images=40, batch_size=32, **{
        "train.compile": True, "train.freeze_backbone_epochs": 1, "train.ema_decay": 0.9, "tta.views": "none"})
    frozen = {}

    def after_epoch(epoch, row):
        if epoch == 1:
            frozen.update({k: v.clone() for k, v in load_checkpoint(fold_dir(cfg, 0) / LAST)["model"].items()})
        epoch_now[0] = epoch + 1

    metrics = train_fold(cfg, 0, on_epoch_end=after_epoch, log=lambda *_: None)
    assert metrics["epochs_trained"] == 2 and 0 <= metrics["best_val_auc"] <= 1
    assert compiled_in_epoch and set(compiled_in_epoch) == {1}, \
        f"graphs compiled in epochs {compiled_in_epoch}: the unfreeze (epoch 2) must compile nothing"
    head = head_parameter_names(build_model(cfg.model))
    torch.manual_seed(cfg.seed * 1000)                       # fold 0's initial weights
    initial = build_model(cfg.model).state_dict()
    moved = {name for name, value in frozen.items() if name in initial and value.dtype.is_floating_point
             and not torch.equal(value, initial[name]) and not name.endswith(("running_mean", "running_var"))}
    assert moved and moved <= head, f"only the head moves in the frozen epoch, not {sorted(moved - head)[:3]}"
