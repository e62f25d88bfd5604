"""Networks: the seed notebook's CNN and any timm backbone, behind one `build_model`.

Every model takes float RGB in [0, 1], (N, 3, 96, 96), normalises it itself (buffers saved with the weights, so a
checkpoint predicts correctly on its own) and returns one logit per image, shape (N,).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from .competition import CHANNELS, IMAGE_SIZE
from .config import ModelConfig
from .errors import KitError


class BaselineCNN(nn.Sequential):
    """The seed's Keras CNN in PyTorch: 3 × (conv 3×3 + ReLU + max-pool), dense 128, dropout, one logit.

    Same shapes as the Keras summary (valid padding): 96→94→47→45→22→20→10, flatten 128×10×10 = 12,800;
    1,731,905 parameters.
    """

    def __init__(self, dropout: float = 0.5):
        super().__init__(
            nn.Conv2d(CHANNELS, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 10 * 10, 128), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 1),
        )


class PatchClassifier(nn.Module):
    """Normalise with the network's own mean/std, run it, return one logit per image."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std).reshape(-1)


def build_model(model_cfg: ModelConfig) -> PatchClassifier:
    if model_cfg.name == "baseline":
        # the seed rescales by 1/255 and nothing more: mean 0, std 1 on [0, 1] input
        return PatchClassifier(BaselineCNN(model_cfg.dropout), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return _build_timm_model(model_cfg)


def _build_timm_model(model_cfg: ModelConfig) -> PatchClassifier:
    import timm

    if not timm.is_model(model_cfg.name):
        close = difflib.get_close_matches(model_cfg.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; `timm.list_models('*name*')` lists names"
        raise KitError(f"config `model.name`: unknown model `{model_cfg.name}` (baseline or a timm name){hint}")
    try:
        net = timm.create_model(model_cfg.name, pretrained=model_cfg.pretrained, num_classes=1,
                                drop_rate=model_cfg.dropout)
    except (OSError, RuntimeError) as err:   # no network and no cached weights, most often
        if not model_cfg.pretrained:
            raise
        raise KitError(f"cannot load pretrained weights for `{model_cfg.name}` ({str(err).splitlines()[0]}); "
                       f"without internet set model.pretrained=false") from None
    data_config = timm.data.resolve_data_config({}, model=net)
    return PatchClassifier(net, mean=data_config["mean"], std=data_config["std"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example_input(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
