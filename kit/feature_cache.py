"""The feature cache of frozen features (`train.frozen_features: true`): a pretrained timm backbone runs once per
training image and TTA view, in inference mode and the kit's autocast precision; its pooled features
(`forward_head(…, pre_logits=True)`, after PatchClassifier's resize and normalisation) are cached beside the image
cache, for kit/features.py to train a head on.

    <cache_dir>/<data folder>/features/
      <image cache>-<backbone key>-<view>.npy   (N, F) float16, memory-mapped, rows in train_labels.csv order
      <image cache>-<backbone key>.json         what the key stands for (model, weights hash, input size, …)

The backbone key hashes the backbone's weights (its state dict, so hub and file weights alike), the model keys that
shape the features (name, input size, pooling, mean/std, any other timm option), the normalisation the model applies,
`augment.valid` and the precision: another experiment with the same backbone reuses the files; anything that changes
a feature gets new ones. The TTA views pick the view files (views two settings share, such as identity, share their
files). The image cache's name (the source files' fingerprint) starts the file name, so changed data gets new
features too.

Each file is a kit/array_cache.py array: locked, resumable a chunk at a time, atomic, free space checked first, rows
written with file writes (a full disk is one line, not a SIGBUS), rebuilt when it does not read back. A build first
removes what no experiment will read again: features of a replaced image cache, and those of a superseded key of this
backbone (same model and weights source, another key, last used before this one), unless a process is building them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .array_cache import CachedArray, build_array, cache_files, cached_arrays, remove_leftovers, resident_images
from .augment import build_transform
from .config import Config, to_dict
from .data import cache_dir_for, check_data_dir
from .device import precision_name
from .errors import KitError
from .inference import TTA_TRANSFORMS, model_outputs
from .io import atomic_write_json, process_lock
from .models import PatchClassifier, head_parameter_names
from .progress import progress_bar, say

FEATURE_DTYPE = np.float16
FEATURE_CHUNK = 8192          # images per resumable step of a build (a killed build loses at most one chunk)
# Model keys that do not change what the backbone computes in eval mode (the weights are hashed instead)
NOT_IN_BACKBONE_KEY = ("pretrained", "pretrained_file", "dropout", "drop_path")
# a feature file's group: <image cache>-<backbone key>, after the dots of a partial build's or a temporary file's name
GROUP = re.compile(r"\.*(?P<image>[a-z]+-\d+-[0-9a-f]{16})-(?P<key>[0-9a-f]{16})[-.]")


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
                    log=say, on_chunk=None) -> FeatureCache:
    """Every view's features of every image of the split (`images`, the memory-mapped image cache), from the cache,
    computing what is missing first. `on_chunk(view, rows_done)` runs after each chunk is recorded (tests)."""
    key, described = backbone_key(cfg, model, amp_dtype)
    folder = feature_dir(cfg)
    image_stem = Path(images.filename).stem
    stem = f"{image_stem}-{key}"
    views = feature_views(cfg.tta.views)
    arrays = [CachedArray(folder / f"{stem}-{view.name}.npy", (len(images), feature_width(model)), FEATURE_DTYPE,
                          f"{cfg.model.name}'s features (view {view.name})", "images") for view in views]
    started, computed = time.perf_counter(), 0

    def build(missing: list[CachedArray]) -> None:
        nonlocal computed
        atomic_write_json(folder / f"{stem}.json", described)          # what the key stands for, and its newest use
        remove_stale_features(folder, image_stem, key, described, log)
        valid_transform = build_transform(cfg.augment.valid, "augment.valid")
        source = resident_images(images, device)      # outside inference mode: the copy is kept for the process
        for array in missing:
            extractor = PooledFeatures(model, views[arrays.index(array)]).eval()
            computed += build_array(array, lambda writer, start, extractor=extractor: view_features(
                extractor, source, writer, start, cfg, device, amp_dtype, valid_transform, on_chunk), log)

    found = cached_arrays(arrays, folder / f"{stem}.lock", build,
                          f"computing {cfg.model.name}'s features in {folder}", log)
    seconds = time.perf_counter() - started
    if computed:
        log(f"feature cache: computed {computed:,} image views of {cfg.model.name} in {seconds:.0f}s "
            f"({computed / max(seconds, 1e-9):,.0f}/s) → {folder}")
    else:
        mark_used(folder / f"{stem}.json")
        log(f"feature cache: reusing {len(views)} view(s) × {len(images):,} images of {cfg.model.name} "
            f"({feature_width(model):,} features each) from {folder}")
    return FeatureCache(views, found, key, seconds, computed)


def view_features(extractor: PooledFeatures, source, writer, start: int, cfg: Config, device: torch.device,
                  amp_dtype, valid_transform, on_chunk):
    """One view's fill (kit/array_cache.build_array): the backbone over the images from row `start`, a chunk at a
    time, each chunk written and yielded (the cache records it), then `on_chunk(view, rows done)`."""
    total = len(source)
    with progress_bar(total=total, initial=start, desc=f"features {extractor.view.name}", unit="img") as bar:
        for first in range(start, total, FEATURE_CHUNK):
            rows = np.arange(first, min(first + FEATURE_CHUNK, total))
            with torch.inference_mode():
                writer.write(first, model_outputs(extractor, source, rows, cfg.eval_batch_size, device, amp_dtype,
                                                  transform=valid_transform, channels_last=cfg.train.channels_last))
            yield first, len(rows)
            bar.update(len(rows))
            if on_chunk is not None:
                on_chunk(extractor.view.name, first + len(rows))


def mark_used(described: Path) -> None:
    """The key's description file's time is its last use (how a superseded key is told apart); a read-only cache
    (a shared one, prepared elsewhere) stays as it is."""
    try:
        os.utime(described)
    except OSError:
        pass


def remove_stale_features(folder: Path, image_stem: str, key: str, described: dict, log) -> None:
    """Remove, in one line, the feature files no experiment will read again: those of a replaced image cache of this
    split (its source files changed), and those of a superseded key of this backbone (same model and weights source,
    another key, last used before this one). A group another process is building (its lock held) is left alone."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in cache_files(folder, f"{image_stem.split('-', 1)[0]}-*"):
        match = GROUP.match(path.name)
        if match and path.suffix != ".lock" and (match["image"], match["key"]) != (image_stem, key):
            groups.setdefault((match["image"], match["key"]), []).append(path)
    mine = folder / f"{image_stem}-{key}.json"
    with ExitStack() as held:
        stale = []
        for (image, other), paths in sorted(groups.items()):
            if image == image_stem and not superseded(folder / f"{image}-{other}.json", described, mine):
                continue
            try:
                held.enter_context(process_lock(folder / f"{image}-{other}.lock", "busy"))
            except KitError:
                continue                                   # being built right now
            stale += paths
        what = f"stale features (of a replaced image cache, or a superseded key of {described['model']['name']})"
        remove_leftovers(stale, what, folder, log)


def superseded(other: Path, described: dict, mine: Path) -> bool:
    """Whether the key described in `other` is this backbone's (same model name and weights source) and was last
    used before the key described in `mine`."""
    try:
        theirs = json.loads(other.read_text())
        return (theirs["model"]["name"] == described["model"]["name"]
                and theirs["weights_from"] == described["weights_from"]
                and other.stat().st_mtime_ns < mine.stat().st_mtime_ns)
    except (OSError, ValueError, KeyError, TypeError):
        return False
