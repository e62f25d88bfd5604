"""Networks: the seed notebook's CNN and any timm backbone, behind one `build_model`.

Every model takes float RGB in [0, 1], (N, 3, 96, 96), normalises it itself (buffers saved with the weights, so a
checkpoint predicts correctly on its own) and returns one logit per image, shape (N,).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch
from torch import nn

from .competition import CHANNELS, IMAGE_SIZE
from .config import ModelConfig
from .errors import KitError, first_line

# model.global_pool: timm's pooling choices ("" = the model's own; catavgmax = fast.ai's concat pooling)
GLOBAL_POOLS = ("", "avg", "max", "avgmax", "catavgmax")


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


class BaselineBNCNN(nn.Sequential):
    """The seed's CNN with BatchNorm after every convolution and the dense layer: same shapes, +1,024 parameters.

    Without normalisation the seed's CNN under Adam 1e-3 can sit at loss ln 2 for epochs (whether it leaves the
    plateau depends on the seed, in Keras as here); normalised activations leave it on every seed (docs/RESULTS.md).
    """

    def __init__(self, dropout: float = 0.5):
        def block(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True),
                    nn.MaxPool2d(2)]

        super().__init__(
            *block(CHANNELS, 32), *block(32, 64), *block(64, 128),
            nn.Flatten(),
            nn.Linear(128 * 10 * 10, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 1),
        )


BASELINES = {"baseline": BaselineCNN, "baseline_bn": BaselineBNCNN}


class PatchClassifier(nn.Module):
    """Resize (when `input_size` asks for it), normalise with the network's own mean/std, run it, return one logit
    per image. The resize happens here, on the device, so training, validation and TTA all see the same input."""

    def __init__(self, net: nn.Module, mean, std, input_size: int = 0):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size and images.shape[-1] != self.input_size:
            # pretrained backbones see ImageNet-sized objects: 96 px patches upscaled (224 in the best public runs)
            images = nn.functional.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                               align_corners=False)
        return self.net((images - self.mean) / self.std).reshape(-1)


def build_model(model_cfg: ModelConfig) -> PatchClassifier:
    if model_cfg.name in BASELINES:
        if model_cfg.input_size not in (0, IMAGE_SIZE) or model_cfg.global_pool:
            raise KitError(f"config `model.name: {model_cfg.name}` has a fixed {IMAGE_SIZE}×{IMAGE_SIZE} input and no "
                           f"global pooling: model.input_size and model.global_pool are for timm models")
        # the seed rescales by 1/255 and nothing more: mean 0, std 1 on [0, 1] input
        net = BASELINES[model_cfg.name](model_cfg.dropout)
        return PatchClassifier(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return _build_timm_model(model_cfg)


@torch.no_grad()
def start_head_neutral(model: PatchClassifier, positive_share: float) -> None:
    """Zero the fresh head's weights and set its bias to the log-odds of the training prior, so the first
    prediction is the prior for every patch and the first loss is the prior's entropy (ln 2 on balanced data).

    Inits scaled for 1,000 classes (timm's EfficientNet: U(±1/sqrt(classes)) over 1,280 features) otherwise start
    one logit at ±10–20 and the first epochs are spent undoing it, dragging the pretrained backbone along.
    """
    head = _head_module(model.net)
    share = min(max(positive_share, 1e-4), 1 - 1e-4)
    head.weight.zero_()
    if head.bias is not None:
        head.bias.fill_(float(torch.logit(torch.tensor(share, dtype=torch.float64))))


def _build_timm_model(model_cfg: ModelConfig) -> PatchClassifier:
    import timm

    if not timm.is_model(model_cfg.name):
        close = difflib.get_close_matches(model_cfg.name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; `timm.list_models('*name*')` lists names"
        raise KitError(f"config `model.name`: unknown model `{model_cfg.name}` (baseline or a timm name){hint}")
    options = {"num_classes": 1, "drop_rate": model_cfg.dropout}
    if model_cfg.drop_path:
        options["drop_path_rate"] = model_cfg.drop_path
    if model_cfg.global_pool:                 # one of GLOBAL_POOLS
        options["global_pool"] = model_cfg.global_pool
    if model_cfg.pretrained_file:
        net = create_timm_model(model_cfg, options, pretrained=False)
        load_backbone_weights(net, model_cfg.name, Path(model_cfg.pretrained_file))
    else:
        try:
            net = create_timm_model(model_cfg, options, pretrained=model_cfg.pretrained)
        except KitError:
            raise
        except Exception as err:   # the hub unreachable (no internet), no local cache entry, …
            if not model_cfg.pretrained:
                raise
            raise KitError(f"cannot load pretrained weights for `{model_cfg.name}` ({type(err).__name__}: "
                           f"{first_line(err, 'no details')}); without internet, set "
                           f"model.pretrained_file=path/to/weights"
                           f".safetensors (e.g. a Kaggle dataset of timm weights) or model.pretrained=false") from None
    data_config = timm.data.resolve_data_config({}, model=net)     # the pretrained weights' mean/std, RGB order
    return PatchClassifier(net, mean=data_config["mean"], std=data_config["std"], input_size=model_cfg.input_size)


# timm keyword → the config key that sets it (a family that lacks one is named with the key to change)
TIMM_OPTION_KEYS = {"drop_rate": ("model.dropout", "0"), "drop_path_rate": ("model.drop_path", "0"),
                    "global_pool": ("model.global_pool", '""')}


def create_timm_model(model_cfg: ModelConfig, options: dict, pretrained: bool) -> nn.Module:
    """`timm.create_model` with the config's options; an option the family's constructor does not take (DenseNet
    has no stochastic depth: no `drop_path_rate`) is one line naming the config key to change."""
    import timm

    try:
        return timm.create_model(model_cfg.name, pretrained=pretrained, **options)
    except TypeError as err:
        refused = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if refused is None or refused.group(1) not in TIMM_OPTION_KEYS:
            raise
        key, neutral = TIMM_OPTION_KEYS[refused.group(1)]
        raise KitError(f"config `model.name: {model_cfg.name}`: this timm family takes no `{refused.group(1)}`, which "
                       f"`{key}` sets; set {key}={neutral} for it (e.g. ARGS='{key}={neutral}')") from None


def load_backbone_weights(net: nn.Module, name: str, weights_file: Path) -> None:
    """Load every backbone tensor from a local file; the classifier stays fresh (ours has one output).

    Reads what timm reads (.pth, .safetensors, {"state_dict": …} checkpoints) and a kit checkpoint (best.pt).
    Any backbone key missing, unexpected or of another shape is refused, naming the keys.
    """
    import timm

    if not weights_file.is_file():
        raise KitError(f"config `model.pretrained_file`: {weights_file} not found")
    try:
        found = timm.models.load_state_dict(str(weights_file))
    except Exception as err:
        raise KitError(f"config `model.pretrained_file`: cannot read {weights_file} ({type(err).__name__}: "
                       f"{first_line(err, 'no details')})") from None
    if found and all(k.startswith("net.") or k in ("mean", "std") for k in found):   # a kit checkpoint
        found = {k[len("net."):]: v for k, v in found.items() if k.startswith("net.")}
    head = classifier_parameter_names(net)
    head_prefixes = tuple(k.rsplit(".", 1)[0] + "." for k in head)
    expected = {k: v for k, v in net.state_dict().items() if k not in head}
    backbone = {k: v for k, v in found.items() if not k.startswith(head_prefixes)}
    missing = [k for k in expected if k not in backbone]
    unexpected = [k for k in backbone if k not in expected]
    wrong_shape = [k for k in expected if k in backbone and backbone[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        def listing(keys):
            return ", ".join(keys[:4]) + (f" … ({len(keys)} in all)" if len(keys) > 4 else "")

        parts = [f"{label}: {listing(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise KitError(f"config `model.pretrained_file`: {weights_file} does not fit `{name}` ({'; '.join(parts)}); "
                       f"use weights saved from the same architecture")
    net.load_state_dict(backbone, strict=False)


def _head_module(net: nn.Module) -> nn.Module:
    """The layer that produces the logit: the seed CNN's last Linear, or timm's classifier."""
    return net[-1] if isinstance(net, tuple(BASELINES.values())) else net.get_classifier()


def classifier_parameter_names(net: nn.Module) -> set[str]:
    """Names (in `net.named_parameters()`) of the classifier: the seed CNN's last layer, or timm's classifier."""
    head_ids = {id(p) for p in _head_module(net).parameters()}
    return {name for name, p in net.named_parameters() if id(p) in head_ids}


def head_parameter_names(model: PatchClassifier) -> set[str]:
    """Names (in `model.named_parameters()`) of the classifier head; everything else is the backbone."""
    return {f"net.{name}" for name in classifier_parameter_names(model.net)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
