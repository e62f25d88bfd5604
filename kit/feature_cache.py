"""The feature cache of frozen features (`train.frozen_features: true`): a pretrained timm backbone runs once per
training image and TTA view, in inference mode and the kit's autocast precision; its pooled features
(`forward_head(…, pre_logits=True)`, after PatchClassifier's resize and normalisation) are cached beside the image
cache, for kit/features.py to train a head on.

    <cache_dir>/<data folder>/features/
      <image cache>-<backbone key>-<view>.npy   (N, F) float16, memory-mapped, rows in train_labels.csv order
      <image cache>-<backbone key>.json         what the key stands for (model, weights hash, input size, …)

The backbone key hashes the backbone's weights (its state dict, so hub and file weights alike), the model keys that
shape the features (name, input size, pooling, any other timm option), mean/std, `augment.valid` and the precision:
another experiment with the same backbone reuses the files; anything that changes a feature gets new ones. The
image cache's name (the source files' fingerprint) starts the file name, so changed data gets new features too.

A build is resumable and atomic: rows are written a chunk at a time into `.<file>.partial`, the count of rows done
is recorded after each chunk (`.<file>.rows`), a killed build continues from there, and the final name appears only
once every row is in. One process builds a backbone's features at a time (a lock, as for the image cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .augment import build_transform
from .config import Config, to_dict
from .data import cache_dir_for, check_data_dir, resident_images
from .device import precision_name
from .errors import Interrupted, KitError
from .inference import TTA_TRANSFORMS, model_outputs
from .io import WHERE_TO_WRITE, atomic_write_json, atomic_write_text, free_bytes, human_bytes, process_lock
from .models import PatchClassifier, head_parameter_names
from .progress import progress_bar

FEATURE_DTYPE = np.float16
FEATURE_CHUNK = 8192          # images per resumable step of a build (a killed build loses at most one chunk)
# Model keys that do not change what the backbone computes in eval mode (the weights are hashed instead)
NOT_IN_BACKBONE_KEY = ("pretrained", "pretrained_file", "dropout", "drop_path")


# ----------------------------------------------------------------------------------------------------------------
# The backbone, its views and its key
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class FeatureView:
    name: str                    # in the file name: "identity", "h1" (horizontal flip), "h1-r90", …
    transformer: object          # ttach's Transformer (None: the image as it is)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.transformer is None else self.transformer.augment_image(images)


SHORT_NAMES = {"HorizontalFlip": "h", "VerticalFlip": "v", "Rotate90": "r"}


def feature_views(views: str) -> list[FeatureView]:
    """The TTA views of `tta.views` (kit/inference.py's), identity first; each named by its non-identity moves,
    so views that two settings share (identity, a horizontal flip) share their files."""
    if TTA_TRANSFORMS[views] is None:
        return [FeatureView("identity", None)]
    compose = TTA_TRANSFORMS[views]()
    found = []
    for parameters, transformer in zip(compose.aug_transform_parameters, compose):
        moves = [f"{SHORT_NAMES.get(type(t).__name__, type(t).__name__.lower())}{int(p)}"
                 for t, p in zip(compose.aug_transforms, parameters) if p != t.identity_param]
        found.append(FeatureView("-".join(moves) or "identity", transformer))
    assert found[0].name == "identity", "ttach lists the identity view first"
    return found


class PooledFeatures(nn.Module):
    """The classifier's own input path (resize, normalise) and the backbone up to the pooled features of one view:
    what its classifier layer sees at prediction time."""

    def __init__(self, model: PatchClassifier, view: FeatureView):
        super().__init__()
        self.model, self.view = model, view

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        net = self.model.net
        return net.forward_head(net.forward_features(self.model.network_input(self.view.apply(images))),
                                pre_logits=True)


def feature_width(model: PatchClassifier) -> int:
    head = model.net.get_classifier()
    return (head[0] if isinstance(head, nn.Sequential) else head).in_features


def backbone_key(cfg: Config, model: PatchClassifier, amp_dtype) -> tuple[str, dict]:
    """A hash of everything that makes the features what they are, and the description it stands for."""
    head = head_parameter_names(model)                     # the classifier is what each fold trains
    weights = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if name in head:
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        weights.update(data.view(torch.uint8).numpy().tobytes())
    described = {"model": {k: v for k, v in to_dict(cfg.model).items() if k not in NOT_IN_BACKBONE_KEY},
                 "weights_sha1": weights.hexdigest(), "mean": model.mean.flatten().tolist(),
                 "std": model.std.flatten().tolist(), "augment_valid": cfg.augment.valid,
                 "precision": precision_name(amp_dtype), "feature_width": feature_width(model)}
    key = hashlib.sha1(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key, {**described, "weights_from": cfg.model.pretrained_file or f"timm: {cfg.model.name}"}  # not hashed


# ----------------------------------------------------------------------------------------------------------------
# The feature cache
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class FeatureCache:
    views: list[FeatureView]
    arrays: list[np.ndarray]     # per view: (N, F) float16, memory-mapped
    key: str
    seconds: float               # spent computing features in this call (0 when every file was there)
    computed: int                # images × views the backbone ran on in this call


def feature_dir(cfg: Config) -> Path:
    return cache_dir_for(cfg, check_data_dir(cfg.data_dir)) / "features"


def cached_features(cfg: Config, model: PatchClassifier, images: np.ndarray, device: torch.device, amp_dtype,
                    log=print, on_chunk=None) -> FeatureCache:
    """Every view's features of every image of the split (`images`, the memory-mapped image cache), from the cache,
    computing what is missing first. `on_chunk(view, rows_done)` runs after each chunk is recorded (tests)."""
    key, described = backbone_key(cfg, model, amp_dtype)
    folder = feature_dir(cfg)
    stem = f"{Path(images.filename).stem}-{key}"
    views = feature_views(cfg.tta.views)
    files = [folder / f"{stem}-{view.name}.npy" for view in views]
    started, computed = time.perf_counter(), 0
    if not all(path.exists() for path in files):
        def say_waiting(holder: str) -> None:
            print(f"waiting for {holder}, which is computing {cfg.model.name}'s features in {folder}", file=sys.stderr)

        with process_lock(folder / f"{stem}.lock", "", wait=True, on_wait=say_waiting):
            remove_stale_features(folder, Path(images.filename).stem)
            atomic_write_json(folder / f"{stem}.json", described)
            valid_transform = build_transform(cfg.augment.valid, "augment.valid")
            for view, path in zip(views, files):
                if not path.exists():
                    computed += build_feature_file(model, view, images, path, cfg, device, amp_dtype,
                                                   valid_transform, log, on_chunk)
    seconds = time.perf_counter() - started
    if computed:
        log(f"feature cache: computed {computed:,} image views of {cfg.model.name} in {seconds:.0f}s "
            f"({computed / max(seconds, 1e-9):,.0f}/s) → {folder}")
    else:
        log(f"feature cache: reusing {len(views)} view(s) × {len(images):,} images of {cfg.model.name} "
            f"({feature_width(model):,} features each) from {folder}")
    return FeatureCache(views, [np.load(path, mmap_mode="r") for path in files], key, seconds, computed)


def remove_stale_features(folder: Path, image_stem: str) -> None:
    """Features of an image cache that no longer exists (the source files changed): of no use to anyone."""
    split = image_stem.split("-", 1)[0]
    for path in folder.glob(f"{split}-*.npy"):
        if not path.name.startswith(image_stem + "-"):
            path.unlink(missing_ok=True)


def build_feature_file(model: PatchClassifier, view: FeatureView, images: np.ndarray, path: Path, cfg: Config,
                       device: torch.device, amp_dtype, valid_transform, log, on_chunk) -> int:
    """Compute one view's features into `path`, a chunk at a time, continuing a killed build; returns how many
    images the backbone ran on. Call it holding the backbone's lock."""
    partial, rows_file = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.rows")
    shape = (len(images), feature_width(model))
    done = resumable_rows(partial, rows_file, shape)
    if done == 0:
        needed, free = shape[0] * shape[1] * np.dtype(FEATURE_DTYPE).itemsize + 4096, free_bytes(path.parent)
        if needed > free:
            raise KitError(f"not enough disk for {cfg.model.name}'s features: {human_bytes(needed)} in {path.parent}, "
                           f"{human_bytes(free)} free there; free some space or {WHERE_TO_WRITE}")
        np.lib.format.open_memmap(partial, mode="w+", dtype=FEATURE_DTYPE, shape=shape).flush()
        atomic_write_text(rows_file, "0")
    else:
        log(f"feature cache: continuing view {view.name} at image {done:,} of {shape[0]:,} (a build was stopped)")
    array = np.load(partial, mmap_mode="r+")
    extractor = PooledFeatures(model, view).eval()
    source = resident_images(images, device)          # outside inference mode: the copy is kept for the process
    bar = progress_bar(total=shape[0], initial=done, desc=f"features {view.name}", unit="img")
    try:
        with bar, torch.inference_mode():
            for start in range(done, shape[0], FEATURE_CHUNK):
                rows = np.arange(start, min(start + FEATURE_CHUNK, shape[0]))
                array[rows] = model_outputs(extractor, source, rows, cfg.eval_batch_size, device, amp_dtype,
                                            transform=valid_transform, channels_last=cfg.train.channels_last)
                array.flush()                                              # the rows on disk before they count
                atomic_write_text(rows_file, str(rows[-1] + 1))
                bar.update(len(rows))
                if on_chunk is not None:
                    on_chunk(view.name, int(rows[-1] + 1))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while computing {cfg.model.name}'s features (view {view.name}): the "
                          f"{int(rows_file.read_text())} images done are kept; rerun the same command to continue "
                          f"from there") from None
    del array
    os.replace(partial, path)                           # the final name only once every row is in
    rows_file.unlink(missing_ok=True)
    return shape[0] - done


def resumable_rows(partial: Path, rows_file: Path, shape: tuple) -> int:
    """How many rows a stopped build of this shape left done (0 when there is none to continue, or it is unusable)."""
    try:
        done = int(rows_file.read_text())
        existing = np.load(partial, mmap_mode="r")
        if existing.shape == shape and existing.dtype == FEATURE_DTYPE and 0 <= done <= shape[0]:
            return done
    except (OSError, ValueError):
        pass
    return 0
