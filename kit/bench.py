"""`make bench`: how fast images go from files to the model, every number from one run on this machine.

It generates its own patches (the demo generator, in a temporary folder) and measures images per second for:
  decode        TIFF → RGB array in one process: the rate of one core
  cache build   the uint8 cache built with every core                  target ≥ 70% of decode × cores
  input (a)     per-image TIFF + albumentations in a DataLoader (the seed's way)     ┐ same transforms,
  input (b)     uint8 cache + albumentations in a DataLoader                         │ same core count:
  input (c)     uint8 cache + batch augmentation on the device (the kit's fast path) ┘ target c ≥ 10 × a
  train step    forward + backward + update on ready batches: the baseline CNN and a timm model
  epoch         input (c) default + step + EMA together, as training runs them    target ≥ 1/1.3 of the step
  TTA inference the 8 D4 views of every image, read from the cache as `make predict` does
On a GPU the models run in each precision the card has (bf16 from compute capability 8.0, fp16), and the peak memory
of each is recorded.
Input pipelines run for two transform lists: D4 alone (configs/demo.yaml's kind) and the kit's default (D4, mild
affine, stain/colour jitter). On a GPU the input must outrun the step (target ≥ 3×), so that the model is the bound.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .array_cache import resident_images
from .augment import batch_equivalent, build_transform
from .batches import AlbumentationsBatches, CachedBatches, to_model_input
from .config import Config, ModelConfig, histology_augmentation
from .data import image_paths, load_split_images, read_image, read_train_labels
from .demo_data import make_demo_data
from .device import autocast_dtype, peak_memory_mb, reset_peak_memory, select_device
from .errors import KitError
from .inference import predict_tta_probabilities
from .io import atomic_write_json, timestamp
from .models import build_model
from .progress import say
from .recipe import TrainingParts, build_training_parts, train_one_epoch

PIPELINES = {
    "d4": [{"name": name, "p": 0.5} for name in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose")],
    "default": histology_augmentation(),
}
FAST_OVER_SEED_WAY = 10.0     # input (c) ÷ input (a), same transforms and cores
CACHE_OVER_DECODE = 0.7       # cache build ÷ (decode rate of one core × cores)
INPUT_OVER_STEP = 3.0         # on a GPU: input (c) ÷ train step, so that the step is the bound
EPOCH_OVER_STEP = 1 / 1.3     # on a GPU: an epoch (input + step + EMA) within 1.3× of the step's own time


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def images_per_second(run, device: torch.device, min_seconds: float, clock=time.perf_counter) -> float:
    """Call `run()` (which returns how many images it handled) once to warm up, then until `min_seconds` pass;
    the images of the timed calls over their time, read from `clock`."""
    run()
    synchronize(device)
    images, start = 0, clock()
    while True:
        images += run()
        synchronize(device)
        elapsed = clock() - start
        if elapsed >= min_seconds:
            return images / elapsed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_epoch(batches) -> int:
    return sum(len(labels) for _, labels in batches)


class TiffDataset(torch.utils.data.Dataset):
    """The seed's way: decode each TIFF when it is asked for, then augment it alone."""

    def __init__(self, paths: list[Path], labels: np.ndarray, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int):
        image = self.transform(image=read_image(self.paths[item]))["image"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(self.labels[item], dtype=torch.float32)


class TiffBatches:
    """(a) as model inputs on the device: the kit's DataLoader path, but decoding every image every time."""

    def __init__(self, paths, labels, transform, batch_size: int, device: torch.device, workers: int):
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            TiffDataset(paths, labels, transform), batch_size=batch_size, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def __iter__(self):
        for images, labels in self.loader:
            yield to_model_input(images, self.device), labels.to(self.device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------------
# The measurements
# ----------------------------------------------------------------------------------------------------------------

def machine_description(device: torch.device, cores: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": cores, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def run_bench(images: int = 4096, device: str = "auto", batch_size: int = 256, timm_model: str = "resnet18",
              min_seconds: float = 2.0, log=say) -> dict:
    """Every measurement of the module docstring; returns the results (images/s), ratios and targets."""
    if images < batch_size or batch_size < 1:
        raise KitError(f"bench: --images ({images}) must be at least --batch-size ({batch_size}), which must be ≥ 1")
    device = select_device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1   # usable ones
    torch.set_num_threads(cores)
    amp_dtype = autocast_dtype(device, amp=True)
    results: dict[str, float] = {}

    def record(name: str, rate: float) -> None:
        results[name] = rate
        log(f"  {name:<44} {rate:>12,.0f} images/s")

    with tempfile.TemporaryDirectory(prefix="kit-bench-") as tmp:
        log(f"generating {images:,} patches …")
        data_dir = make_demo_data(Path(tmp) / "data", n_train=images, n_test=0, seed=0)
        table = read_train_labels(data_dir)
        ids, labels = table["id"], table["label"].to_numpy()
        paths = image_paths(data_dir / "train", ids)

        # ---- files → the uint8 cache ------------------------------------------------------------------------
        def decode_all() -> int:
            for path in paths:
                read_image(path)
            return len(paths)

        builds = []

        def build_cache() -> int:                        # a fresh folder each time: a build, never a reuse
            if len(builds) > 1:                          # drop the one before (its pages need never reach the disk)
                shutil.rmtree(builds[-1])
            builds.append(Path(tmp) / f"cache{len(builds)}")
            return len(load_split_images(data_dir, "train", ids, builds[-1], workers=cores, progress=False))

        record("decode (1 core)", images_per_second(decode_all, torch.device("cpu"), min_seconds))
        record(f"cache build ({cores} cores)", images_per_second(build_cache, torch.device("cpu"), min_seconds))
        cache = load_split_images(data_dir, "train", ids, builds[0], progress=False)

        # ---- input pipelines: model-ready batches on the device -----------------------------------------------
        rows = np.arange(len(cache))
        resident = resident_images(cache, device)
        for pipeline, specs in PIPELINES.items():
            transform = build_transform(specs, f"bench {pipeline}")
            candidates = {       # built one at a time, each after the previous one's workers have ended
                "a": functools.partial(TiffBatches, paths, labels, transform, batch_size, device, cores),
                "b": functools.partial(AlbumentationsBatches, cache, rows, labels, transform, batch_size, device,
                                       cores),
                "c": functools.partial(CachedBatches, resident, rows, labels, batch_size, device,
                                       batch_equivalent(transform, pipeline)),
            }
            for letter, make in candidates.items():
                batches = make()
                epoch = functools.partial(one_epoch, batches)
                record(f"input ({letter}) {pipeline}", images_per_second(epoch, device, min_seconds))
                del epoch, batches            # ends its DataLoader workers before the next loader forks its own
                gc.collect()

        # ---- the model: one training step, an epoch, and inference with 8 TTA views ---------------------------
        inputs = torch.rand(batch_size, 3, 96, 96, device=device).contiguous(memory_format=torch.channels_last)
        targets = (torch.rand(batch_size, device=device) > 0.5).float()
        steps = 20 if device.type == "cuda" else 2
        epoch_rows = rows if device.type == "cuda" else rows[:2 * batch_size]       # a CPU-sized share
        augment = batch_equivalent(build_transform(PIPELINES["default"], "bench default"), "default")
        peak_memory = {}
        for name in ("baseline", timm_model):
            for precision, dtype in model_precisions(device, amp_dtype).items():
                cfg = dataclasses.replace(Config(), model=ModelConfig(name=name, pretrained=False))
                model = build_model(cfg.model).to(device).to(memory_format=torch.channels_last)
                label = f"{name}{precision}"
                reset_peak_memory(device)
                step_batches = [(inputs, targets)] * steps
                step_parts = training_parts(cfg, model, steps, device, dtype, ema=False)
                epoch_batches = CachedBatches(resident, epoch_rows, labels[epoch_rows], batch_size, device, augment)
                epoch_parts = training_parts(cfg, model, len(epoch_batches), device, dtype, ema=True)

                train_steps = functools.partial(training_pass, model, step_batches, step_parts, device, dtype,
                                                steps * batch_size)
                train_epoch = functools.partial(training_pass, model, epoch_batches, epoch_parts, device, dtype,
                                                len(epoch_batches) * batch_size)
                subset = cache if device.type == "cuda" else cache[:batch_size]     # 8 views × a CPU-sized share
                predict_with_tta = functools.partial(tta_pass, model, subset, batch_size, device, dtype)
                record(f"train step {label}", images_per_second(train_steps, device, min_seconds))
                record(f"epoch (input + step + EMA) {label}", images_per_second(train_epoch, device, min_seconds))
                record(f"TTA ×8 inference {label}", images_per_second(predict_with_tta, device, min_seconds))
                del train_steps, train_epoch, predict_with_tta
                if device.type == "cuda":
                    peak_memory[label] = peak_memory_mb(device)
                    log(f"  {'peak memory ' + label:<44} {peak_memory[label]:>12,.0f} MB")
                del model, step_parts, epoch_parts
                gc.collect()

    return summarise(results, machine_description(device, cores), {
        "images": images, "batch_size": batch_size, "timm_model": timm_model, "min_seconds": min_seconds,
        "amp": str(amp_dtype) if amp_dtype else None, "pipelines": PIPELINES}, peak_memory)


def training_pass(model, batches, parts: TrainingParts, device: torch.device, amp_dtype, images: int) -> int:
    """One pass of `train_one_epoch` over `batches` (`images` in all); returns `images`."""
    train_one_epoch(model, batches, parts, device, amp_dtype, desc=None)
    return images


def tta_pass(model, images, batch_size: int, device: torch.device, amp_dtype) -> int:
    """The 8 D4 views of `images` through `model`; the images predicted."""
    return len(predict_tta_probabilities(model, images, "d4", batch_size, device, amp_dtype))


def model_precisions(device: torch.device, amp_dtype) -> dict:
    """{label suffix: autocast dtype}: the kit's choice unlabelled; on a bf16 card also fp16 (what a T4 runs)."""
    precisions = {"": amp_dtype}
    if amp_dtype == torch.bfloat16:
        precisions[" fp16"] = torch.float16
    return precisions


def training_parts(cfg: Config, model, steps: int, device: torch.device, amp_dtype, ema: bool) -> TrainingParts:
    """The fold's own recipe (`build_training_parts`), with the EMA a fold runs when the config asks for one."""
    if ema:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=0.999))
    return build_training_parts(cfg, model, steps, amp_dtype)


def summarise(results: dict, machine: dict, settings: dict, peak_memory: dict | None = None) -> dict:
    """The targets' ratios, each computed from numbers of this run; the step targets apply on a GPU only."""
    cores, on_gpu = machine["cores"], machine["gpu"] is not None

    def target(value: float, needs: float, applies: bool = True) -> dict:
        return {"value": value, "needs": needs, "met": value >= needs, "applies": applies}

    targets = {f"(c) / (a), {p}": target(results[f"input (c) {p}"] / results[f"input (a) {p}"], FAST_OVER_SEED_WAY)
               for p in PIPELINES}
    targets["cache build / (decode × cores)"] = target(
        results[f"cache build ({cores} cores)"] / (results["decode (1 core)"] * cores), CACHE_OVER_DECODE)
    for model in ("baseline", settings["timm_model"]):
        targets[f"(c) default / train step {model}"] = target(
            results["input (c) default"] / results[f"train step {model}"], INPUT_OVER_STEP, applies=on_gpu)
        targets[f"epoch / train step {model}"] = target(
            results[f"epoch (input + step + EMA) {model}"] / results[f"train step {model}"], EPOCH_OVER_STEP,
            applies=on_gpu)
    return {"machine": machine, "settings": settings, "results": results, "targets": targets,
            "peak_memory_mb": peak_memory or {}}


def format_table(report: dict) -> str:
    """The results, peak memory and targets as a plain-text table."""
    machine = report["machine"]
    lines = [f"{machine['cpu']}, {machine['cores']} cores, {machine['gpu'] or 'no GPU'}; torch {machine['torch']}",
             "", f"{'measurement':<46}{'images/s':>12}", "-" * 58]
    lines += [f"{name:<46}{rate:>12,.0f}" for name, rate in report["results"].items()]
    if report.get("peak_memory_mb"):
        lines += ["", f"{'peak GPU memory (step, epoch, TTA)':<46}{'MB':>12}", "-" * 58]
        lines += [f"{name:<46}{mb:>12,.0f}" for name, mb in report["peak_memory_mb"].items()]
    lines += ["", f"{'target':<46}{'value':>8}{'needs':>8}  result", "-" * 72]
    for name, target in report["targets"].items():
        verdict = ("met" if target["met"] else "MISSED") if target["applies"] else "n/a (GPU target)"
        lines.append(f"{name:<46}{target['value']:>8.2f}{'≥ ' + format(target['needs'], '.3g'):>8}  {verdict}")
    return "\n".join(lines)


def bench(out_dir: str | Path = "runs/bench", log=say, **options) -> Path:
    """Run the benchmark, print the table, write it as JSON to `out_dir/bench-<time>.json`; return that path."""
    report = run_bench(log=log, **options)
    path = Path(out_dir) / f"bench-{timestamp()}.json"
    atomic_write_json(path, report)
    log("\n" + format_table(report))
    return path
