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


class StackedTTA(nn.Module):
    """The mean probability over ttach's views, with every view of a batch in one forward pass: (V·N, C, H, W)
    instead of V passes of N, so a GPU runs one large batch (and TTA-time BatchNorm is in eval mode, so stacking
    changes nothing). The views and their inverses are ttach's own."""

    def __init__(self, model: nn.Module, transforms: ttach.Compose):
        super().__init__()
        self.model, self.transforms = Probability(model), transforms

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = list(self.transforms)
        stacked = torch.cat([view.augment_image(images) for view in views])
        probabilities = self.model(stacked).split(len(images))
        return torch.stack([view.deaugment_label(p) for view, p in zip(views, probabilities)]).mean(0)


def with_tta(model: nn.Module, views: str) -> nn.Module:
    """The model returning the mean probability over the TTA views (ttach does the flips and rotations)."""
    if TTA_TRANSFORMS[views] is None:
        return Probability(model)
    return StackedTTA(model, TTA_TRANSFORMS[views]())


def tta_view_count(views: str) -> int:
    return 1 if TTA_TRANSFORMS[views] is None else len(TTA_TRANSFORMS[views]())
