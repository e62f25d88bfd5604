"""Networks: the seed notebook's CNN and any timm backbone (kit/backbones.py: timm's registry, or a hub model
`hf-hub:org/name`, kit/hub.py), behind one `build_model` that checks what it builds with one forward pass that costs
nothing; the classifier head; and which parameters train (`model.trainable_blocks`).

Every model takes float RGB in [0, 1], (N, 3, 96, 96), normalises it itself (buffers saved with the weights, so a
checkpoint predicts correctly on its own) and returns one logit per image, shape (N,).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .backbones import build_backbone, classifier_parameter_names, model_input_size, pretrained_mean_std
from .competition import CHANNELS, IMAGE_SIZE
from .config import ModelConfig
from .errors import KitError, first_line

MLP_HIDDEN = 256
# model.global_pool (config.GLOBAL_POOLS) → timm's create_model options ("" = the model's own pooling)
GLOBAL_POOL_OPTIONS = {"": {}, "avg": {"global_pool": "avg"}, "max": {"global_pool": "max"},
                       "avgmax": {"global_pool": "avgmax"}, "catavgmax": {"global_pool": "catavgmax"}}


class SeedCNN(nn.Sequential):
    """The seed's CNNs: a plain sequence whose last layer is the classifier (found the way timm's are)."""

    def get_classifier(self) -> nn.Module:
        return self[-1]


class BaselineCNN(SeedCNN):
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


class BaselineBNCNN(SeedCNN):
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
        self.notes: list[str] = []           # what the build decided for the user (the fold's log shows them)
        self.frozen_parameter_names: set[str] = set()   # model.trainable_blocks: never trained, in no optimizer group
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """What `net` sees: the patches resized and normalised (frozen features are computed from it too)."""
        if self.input_size and images.shape[-1] != self.input_size:
            # pretrained backbones see ImageNet-sized objects: 96 px patches upscaled (224 in the best public runs)
            images = nn.functional.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                               align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.network_input(images)).reshape(-1)


def build_model(model_cfg: ModelConfig, initial_weights: bool = True) -> PatchClassifier:
    """The model `model_cfg` describes, its architecture checked first (`check_architecture`: before any weights are
    fetched or read). `initial_weights=False`: the architecture only, for weights loaded next (a best.pt): no
    download and no weights file read, though a hub model's config.json is still looked for beside
    `model.pretrained_file` (when that path exists here) before the Hugging Face cache."""
    if model_cfg.name in BASELINES:
        if model_cfg.input_size not in (0, IMAGE_SIZE) or model_cfg.global_pool:
            raise KitError(f"config `model.name: {model_cfg.name}` has a fixed {IMAGE_SIZE}×{IMAGE_SIZE} input and no "
                           f"global pooling: model.input_size and model.global_pool are for timm models")
        if model_cfg.timm_kwargs:
            raise KitError(f"config `model.name: {model_cfg.name}` is the kit's own CNN: model.timm_kwargs are for "
                           f"timm models; set model.timm_kwargs={{}}")
    check_architecture(model_cfg)
    model = assemble_model(model_cfg, initial_weights)
    if model_cfg.trainable_blocks:
        freeze_early_blocks(model, model_cfg)
    return model


def assemble_model(model_cfg: ModelConfig, initial_weights: bool = True) -> PatchClassifier:
    """The network in its PatchClassifier: a seed CNN, or a timm backbone normalised with its own mean/std unless
    the config sets them, resized to the one size it takes when it takes one only."""
    if model_cfg.name in BASELINES:
        # the seed rescales by 1/255 and nothing more: mean 0, std 1 on [0, 1] input
        net = BASELINES[model_cfg.name](model_cfg.dropout)
        return PatchClassifier(net, mean=model_cfg.mean or (0.0, 0.0, 0.0), std=model_cfg.std or (1.0, 1.0, 1.0))
    options = {"num_classes": 1, "drop_rate": model_cfg.dropout, **GLOBAL_POOL_OPTIONS[model_cfg.global_pool]}
    if model_cfg.drop_path:
        options["drop_path_rate"] = model_cfg.drop_path
    net = build_backbone(model_cfg, options, initial_weights)
    mean, std = pretrained_mean_std(net)          # the model's pretrained config (a hub model's own)
    model = PatchClassifier(net, mean=model_cfg.mean or mean, std=model_cfg.std or std,
                            input_size=model_input_size(model_cfg, net))
    if model.input_size and not model_cfg.input_size:
        model.notes.append(f"model.input_size 0: `{model_cfg.name}` takes only {model.input_size}×{model.input_size} "
                           f"input (a fixed size), so the 96 px patches are resized to {model.input_size} on the device")
    return model


# ----------------------------------------------------------------------------------------------------------------
# The architecture checked before it is built for real: `model.timm_kwargs` that timm accepts but that cannot work
# (in_chans: 4 fails at the first training step; depth: abc deep inside timm) are one line naming the key
# ----------------------------------------------------------------------------------------------------------------

def check_architecture(model_cfg: ModelConfig) -> None:
    """Build the architecture and pass it one batch of the kit's patches, (1, 3, 96, 96), on the meta device (shapes
    only: no memory, no arithmetic; a second or two for a ViT-g); a failure there is tried again for real on the CPU
    (its error is the one shown, and an op the meta device lacks cannot refuse a model that works). A failure is
    one line naming the `model.timm_kwargs` key it comes from, else the model."""
    problem = try_architecture(model_cfg, "meta") and try_architecture(model_cfg, "cpu")
    if problem is None:
        return
    stage, err = problem
    key = breaking_timm_kwarg(model_cfg, "meta") or breaking_timm_kwarg(model_cfg, "cpu")
    resized = f", resized to {model_cfg.input_size} px" if model_cfg.input_size else ""
    seen = "cannot be built" if stage == "build" else (f"fails on a batch of the kit's patches, (1, {CHANNELS}, "
                                                       f"{IMAGE_SIZE}, {IMAGE_SIZE}) RGB on [0, 1]{resized}")
    cause = f"({type(err).__name__}: {first_line(err)})"
    if key is not None:
        with_it = f"{seen} with it" if stage == "build" else f"built with it {seen}"
        raise KitError(f"config `model.timm_kwargs.{key}: {model_cfg.timm_kwargs[key]}`: `{model_cfg.name}` {with_it} "
                       f"{cause}; change or drop it (the model card's timm.create_model arguments)")
    fix = "choose another model.name" if stage == "build" else \
        "set model.input_size to a size it takes (e.g. its pretrained 224), or choose another model.name"
    raise KitError(f"config `model.name: {model_cfg.name}`: the model {seen} {cause}; {fix}")


def try_architecture(model_cfg: ModelConfig, device: str) -> tuple[str, Exception] | None:
    """("build" or "forward", the error) when the architecture cannot be built on `device` or cannot take one batch
    of patches there; None when it can. A KitError (an option refused by name) is raised as it is."""
    stage = "build"
    try:
        with torch.device(device):
            model = assemble_model(model_cfg, initial_weights=False).eval()
            images = torch.zeros(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        stage = "forward"
        with torch.no_grad():
            logits = model(images)
        if logits.shape != (1,):
            raise ValueError(f"one image gave {logits.numel()} outputs, not one logit")
        return None
    except KitError:
        raise
    except Exception as err:     # whatever timm or torch raises: a TypeError, a shape error, an assertion, …
        return stage, err


def breaking_timm_kwarg(model_cfg: ModelConfig, device: str) -> str | None:
    """The `model.timm_kwargs` key the failure on `device` comes from: the one whose removal gets the architecture
    furthest (through a forward pass, else built at all where it was not: of two faults, the one shown), the first
    in the config on a tie; None when no removal gets it further (the model's own failure, or one the meta device
    alone has: then the CPU is asked)."""
    def progress(values: dict) -> int:         # 0 not built, 1 built, 2 through a forward pass; -1 refused by name
        try:
            problem = try_architecture(replace(model_cfg, timm_kwargs=values), device)
        except KitError:                       # dynamic_img_size gone, model.input_size refused: no clue
            return -1
        return 2 if problem is None else {"build": 0, "forward": 1}[problem[0]]

    reached = progress(model_cfg.timm_kwargs)
    without = {key: progress({k: v for k, v in model_cfg.timm_kwargs.items() if k != key})
               for key in model_cfg.timm_kwargs}
    best = max(without, key=without.get, default=None)         # max keeps the first of equals
    return best if best is not None and without[best] > reached else None


@torch.no_grad()
def start_head_neutral(model: PatchClassifier, positive_share: float) -> None:
    """Zero the fresh head's weights and set its bias to the log-odds of the training prior, so the first
    prediction is the prior for every patch and the first loss is the prior's entropy (ln 2 on balanced data).

    Inits scaled for 1,000 classes (timm's EfficientNet: U(±1/sqrt(classes)) over 1,280 features) otherwise start
    one logit at ±10–20 and the first epochs are spent undoing it, dragging the pretrained backbone along.
    """
    head = model.net.get_classifier()
    head = head[-1] if isinstance(head, nn.Sequential) else head     # an MLP head (set_frozen_head): its last layer
    share = min(max(positive_share, 1e-4), 1 - 1e-4)
    head.weight.zero_()
    if head.bias is not None:
        head.bias.fill_(float(torch.logit(torch.tensor(share, dtype=torch.float64))))


def head_parameter_names(model: PatchClassifier) -> set[str]:
    """Names (in `model.named_parameters()`) of the classifier head; everything else is the backbone."""
    return {f"net.{name}" for name in classifier_parameter_names(model.net)}


def backbone_blocks(net: nn.Module) -> list[nn.Module]:
    """The backbone's blocks, input to output, where the family keeps them in one simple sequence: a ViT's (or
    EfficientNet's stages') `blocks`, ConvNeXt-style `stages`, ResNet's layer1–4; [] for any other family."""
    for attribute in ("blocks", "stages"):
        container = getattr(net, attribute, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return list(container)
    layers = [getattr(net, f"layer{number}", None) for number in range(1, 5)]
    return layers if all(isinstance(layer, nn.Module) for layer in layers) else []


def freeze_early_blocks(model: PatchClassifier, model_cfg: ModelConfig) -> None:
    """`model.trainable_blocks: N`: the last N blocks, what follows them (final norm, head) train; the stem and the
    earlier blocks are frozen for good (`requires_grad` off, kept out of the optimizer and the EMA's updates).
    A partial fine-tune of a large ViT: less memory, faster steps, and the pretrained early features kept."""
    count = model_cfg.trainable_blocks
    blocks = backbone_blocks(model.net)
    if not blocks:
        raise KitError(f"config `model.trainable_blocks: {count}`: `{model_cfg.name}` keeps no simple sequence of "
                       f"blocks (a ViT's blocks, ConvNeXt/EfficientNet stages, ResNet layers); set "
                       f"model.trainable_blocks=0 (all train) for it")
    if count > len(blocks):
        raise KitError(f"config `model.trainable_blocks: {count}`: `{model_cfg.name}` has {len(blocks)} blocks; use "
                       f"1 to {len(blocks)}, or 0 for all")
    first_trained = {id(p) for p in blocks[-count].parameters()}
    named = list(model.net.named_parameters())
    start = next(i for i, (_, parameter) in enumerate(named) if id(parameter) in first_trained)
    head = classifier_parameter_names(model.net)
    frozen = [(name, parameter) for name, parameter in named[:start] if name not in head]   # in registration order:
    for _, parameter in frozen:                                      # stem and tokens first, then the early blocks
        parameter.requires_grad_(False)
    model.frozen_parameter_names = {f"net.{name}" for name, _ in frozen}
    trained = count_parameters(model) - sum(parameter.numel() for _, parameter in frozen)
    model.notes.append(f"model.trainable_blocks {count}: the last {count} of {len(blocks)} blocks and the head train "
                       f"({trained:,} of {count_parameters(model):,} parameters); the rest of the backbone is frozen")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_frozen_head(model: PatchClassifier, kind: str) -> PatchClassifier:
    """The `train.frozen_head` head in the model's classifier slot. Called where the model is built for frozen
    features and where best.pt is rebuilt (kit/checkpoints.py), so the architecture follows from the saved config
    alone."""
    return FROZEN_HEAD_BUILDERS[kind](model)


def mlp_head(model: PatchClassifier) -> PatchClassifier:
    """Linear → ReLU → Dropout → Linear (MLP_HIDDEN wide) in the timm model's classifier slot."""
    kind = "mlp"
    net = model.net
    slot = getattr(net, "pretrained_cfg", {}).get("classifier")
    if not isinstance(slot, str):
        raise KitError(f"config `train.frozen_head: {kind}`: timm's `{type(net).__name__}` names no single classifier "
                       f"layer; use train.frozen_head=linear")
    parent_path, _, name = slot.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    dropout = float(getattr(net, "drop_rate", 0.0) or 0.0)
    features = net.get_classifier().in_features          # the pooled width (catavgmax doubles num_features)
    setattr(parent, name, nn.Sequential(nn.Linear(features, MLP_HIDDEN), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(MLP_HIDDEN, 1)))
    return model


# train.frozen_head (config.FROZEN_HEADS) → what puts that head in the classifier slot: timm's own Linear, or an MLP
FROZEN_HEAD_BUILDERS = {"linear": lambda model: model, "mlp": mlp_head}
