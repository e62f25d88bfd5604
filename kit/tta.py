"""Test-time augmentation (ttach): a model wrapped to return its mean probability over the configured views.

The same wrapper serves a fold's out-of-fold predictions (engine) and the test predictions (predict), so the CV AUC
describes the model that is submitted.
"""

from __future__ import annotations

import torch
import ttach
from torch import nn

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
