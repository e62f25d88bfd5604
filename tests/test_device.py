"""The GPU decisions, tested on the CPU (CI has no GPU): precision by the card's capability, cards without kernels
refused, bf16 and fp16 (with loss scaling) through training and TTA, resume across precisions, the memory fit
check counting PyTorch's cache, freezing by a zero learning rate, and no blocking copy in the training loop."""

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import kit.device
import kit.engine
from kit.augment import batch_equivalent, build_transform
from kit.batches import CachedBatches
from kit.checkpoints import load_checkpoint
from kit.config import Config, ModelConfig, histology_augmentation
from kit.device import autocast_dtype, has_kernels, select_device, spare_memory
from kit.errors import KitError
from kit.fold import train_fold
from kit.inference import predict_tta_probabilities
from kit.models import build_model, head_parameter_names
from kit.recipe import TrainingParts, build_loss, build_optimizer, build_scheduler, hold_backbone, train_one_epoch
from kit.runs import LAST, fold_dir

from conftest import assert_the_best_epoch_is_kept

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
    from kit.array_cache import fits_resident
    from kit.competition import TRAIN_IMAGES
    from kit.data import ROW_BYTES

    split, gib = TRAIN_IMAGES * ROW_BYTES, 2**30       # 6.1 GB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    for spare, held in [(14.5 * gib, True), (11 * gib, False)]:       # a T4's spare memory; a 12 GB card's
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, spare=spare: (int(spare), 16 * gib))
        assert fits_resident(split, torch.device("cuda")) is held
    assert not fits_resident(1, CPU)


def test_swa_recomputes_batchnorm_in_the_training_precision_and_times_it(quick_config, monkeypatch):
    seen = []
    real_update_bn = kit.engine.update_bn

    def recording_update_bn(loader, model, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_update_bn(loader, model, *args, **kwargs)

    monkeypatch.setattr(kit.engine, "update_bn", recording_update_bn)
    monkeypatch.setattr(kit.engine, "autocast_dtype", lambda *args: torch.bfloat16)     # as on an A100 or later
    cfg = quick_config(epochs=1, max_train_images=64, **{"train.swa_epochs": 1, "tta.views": "none",
                                                        "folds.n_splits": 4})      # bf16 on a CPU is slow
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
    cfg = quick_config(epochs=2, max_train_images=32, **{"folds.n_splits": 10, "tta.views": "none"})
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
    assert metrics["epochs_trained"] == 2
    assert_the_best_epoch_is_kept(cfg, 0, metrics)
    assert compiled_in_epoch and set(compiled_in_epoch) == {1}, \
        f"graphs compiled in epochs {compiled_in_epoch}: the unfreeze (epoch 2) must compile nothing"
    head = head_parameter_names(build_model(cfg.model))
    torch.manual_seed(cfg.seed * 1000)                       # fold 0's initial weights
    initial = build_model(cfg.model).state_dict()
    moved = {name for name, value in frozen.items() if name in initial and value.dtype.is_floating_point
             and not torch.equal(value, initial[name]) and not name.endswith(("running_mean", "running_var"))}
    assert moved and moved <= head, f"only the head moves in the frozen epoch, not {sorted(moved - head)[:3]}"
