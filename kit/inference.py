"""Inference: a model's outputs over a split of the uint8 cache, and test-time augmentation (ttach).

`predict_logits` gives the one-view logits validation scores each epoch; `predict_tta_probabilities` the mean
probability over the configured views, which both a fold's out-of-fold predictions (kit/engine.py) and the test
predictions (kit/predict.py) use, so the CV AUC describes the model that is submitted. The view names (TTA_VIEWS)
are defined here; the config schema reads them from here.
"""

from __future__ import annotations

import numpy as np
import torch
import ttach
from torch import nn

from .array_cache import resident_images
from .augment import NoBatchEquivalent, batch_equivalent
from .batches import augmented_model_input, gather_batch, to_model_input
from .progress import progress_bar


def flip4_transform() -> ttach.Compose:
    """No flip, horizontal, vertical, both: the 4 views of the best public PCam solutions."""
    return ttach.Compose([ttach.HorizontalFlip(), ttach.VerticalFlip()])


TTA_TRANSFORMS = {
    "d4": ttach.aliases.d4_transform,          # flips × 90° rotations: 8 views, all label-preserving here
    "flip4": flip4_transform,                  # 4 views
    "hflip": ttach.aliases.hflip_transform,    # 2 views
    "none": None,
}


class Probability(nn.Module):
    """Logit → probability, so TTA averages probabilities rather than logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images).float())


STACKED_IMAGES = 2048     # images per forward pass when views are stacked: large GPU batches, bounded memory


class StackedTTA(nn.Module):
    """The mean probability over ttach's views, with the views of a batch stacked into one forward pass (as many as
    fit in STACKED_IMAGES: all 8 for a batch of 256) instead of one pass per view, so a GPU runs large batches.
    BatchNorm is in eval mode at TTA time, so stacking changes nothing; the views and their inverses are ttach's."""

    def __init__(self, model: nn.Module, transforms: ttach.Compose):
        super().__init__()
        self.model, self.transforms = Probability(model), transforms

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = list(self.transforms)
        per_pass = max(1, STACKED_IMAGES // max(1, len(images)))
        probabilities = []
        for start in range(0, len(views), per_pass):
            group = views[start:start + per_pass]
            outputs = self.model(torch.cat([view.augment_image(images) for view in group])).split(len(images))
            probabilities += [view.deaugment_label(p) for view, p in zip(group, outputs)]
        return torch.stack(probabilities).mean(0)


def with_tta(model: nn.Module, views: str) -> nn.Module:
    """The model returning the mean probability over the TTA views (ttach does the flips and rotations)."""
    if TTA_TRANSFORMS[views] is None:
        return Probability(model)
    return StackedTTA(model, TTA_TRANSFORMS[views]())


def tta_view_count(views: str) -> int:
    return 1 if TTA_TRANSFORMS[views] is None else len(TTA_TRANSFORMS[views]())


@torch.no_grad()
def model_outputs(model, images, indices: np.ndarray | None, batch_size: int, device, amp_dtype=None,
                  desc: str | None = None, transform=None, channels_last: bool = True) -> np.ndarray:
    """What `model` returns per image (one number) for `images[indices]` (all when None), batch by batch from the
    uint8 cache, on the training fast path: the split is held in GPU memory when it fits (`resident_images`; pass a
    resident tensor to reuse one). Outputs stay on the device until the end: no wait for the GPU per batch.

    `transform` (the config's `augment.valid`, usually empty) runs as a batch op when it has a batch equivalent
    (with a fixed seed), else per image through albumentations.
    """
    model.eval()
    images = resident_images(images, device)
    order = np.arange(len(images)) if indices is None else np.asarray(indices)
    augment, generator = None, torch.Generator().manual_seed(0)
    if transform is not None:
        try:
            augment, transform = batch_equivalent(transform, "augment.valid"), None
        except NoBatchEquivalent:
            pass
    outputs = []
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, desc=desc, unit="batch", leave=False, hidden=desc is None):
        batch = gather_batch(images, order[start:start + batch_size], device)
        if transform is not None:                                                 # per image, on the CPU
            batch = torch.from_numpy(np.stack([transform(image=image)["image"] for image in batch.cpu().numpy()]))
        if augment is None:
            inputs = to_model_input(batch, device, channels_last)
        else:                  # a D4 move regroups the batch: carry each image's position to put its logit back
            positions = torch.arange(len(batch), device=batch.device)
            inputs, positions = augmented_model_input(batch, positions, augment, generator, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs).float()
        if augment is not None:
            logits = torch.empty_like(logits).index_copy_(0, positions, logits)
        outputs.append(logits)
    return torch.cat(outputs).cpu().numpy() if outputs else np.empty(0, dtype=np.float32)


def predict_logits(model, images, indices: np.ndarray | None, batch_size: int, device, amp_dtype=None,
                   desc: str | None = None, transform=None, channels_last: bool = True) -> np.ndarray:
    """The model's logits for `images[indices]`, one view: what validation scores each epoch."""
    return model_outputs(model, images, indices, batch_size, device, amp_dtype, desc, transform, channels_last)


def predict_tta_probabilities(model, images, views: str, batch_size: int, device, amp_dtype=None,
                              desc: str | None = None, rows: np.ndarray | None = None, transform=None,
                              channels_last: bool = True) -> np.ndarray:
    """The mean probability over the TTA views (`tta.views`) for `images[rows]` (all when None): what the submission
    averages, and what a fold's oof.csv holds."""
    return model_outputs(with_tta(model, views), images, rows, batch_size, device, amp_dtype, desc, transform,
                         channels_last)
