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


def with_tta(model: nn.Module, views: str) -> nn.Module:
    """The model returning the mean probability over the TTA views (ttach does the flips and rotations)."""
    if TTA_TRANSFORMS[views] is None:
        return Probability(model)
    return ttach.ClassificationTTAWrapper(Probability(model), TTA_TRANSFORMS[views](), merge_mode="mean")


def tta_view_count(views: str) -> int:
    return 1 if TTA_TRANSFORMS[views] is None else len(TTA_TRANSFORMS[views]())
