"""Networks: the seed notebook's CNN and any timm backbone (timm's registry, or a hub model `hf-hub:org/name` from
the hub, the local Hugging Face cache or a folder of its files), behind one `build_model`; and which of its
parameters train (`model.trainable_blocks`).

Every model takes float RGB in [0, 1], (N, 3, 96, 96), normalises it itself (buffers saved with the weights, so a
checkpoint predicts correctly on its own) and returns one logit per image, shape (N,).
"""

from __future__ import annotations

import difflib
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .competition import CHANNELS, IMAGE_SIZE
from .config import DOTTED_NAME, TIMM_OBJECT_PREFIXES, ModelConfig
from .errors import KitError, first_line

MLP_HIDDEN = 256
# model.global_pool (config.GLOBAL_POOLS) → timm's create_model options ("" = the model's own pooling)
GLOBAL_POOL_OPTIONS = {"": {}, "avg": {"global_pool": "avg"}, "max": {"global_pool": "max"},
                       "avgmax": {"global_pool": "avgmax"}, "catavgmax": {"global_pool": "catavgmax"}}


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
    """The model `model_cfg` describes. `initial_weights=False`: the architecture only, for weights loaded next (a
    best.pt): no download and no weights file read, though a hub model's config.json is still looked for beside
    `model.pretrained_file` (when that path exists here) before the Hugging Face cache."""
    if model_cfg.name in BASELINES:
        if model_cfg.input_size not in (0, IMAGE_SIZE) or model_cfg.global_pool:
            raise KitError(f"config `model.name: {model_cfg.name}` has a fixed {IMAGE_SIZE}×{IMAGE_SIZE} input and no "
                           f"global pooling: model.input_size and model.global_pool are for timm models")
        if model_cfg.timm_kwargs:
            raise KitError(f"config `model.name: {model_cfg.name}` is the kit's own CNN: model.timm_kwargs are for "
                           f"timm models; set model.timm_kwargs={{}}")
        # the seed rescales by 1/255 and nothing more: mean 0, std 1 on [0, 1] input
        net = BASELINES[model_cfg.name](model_cfg.dropout)
        model = PatchClassifier(net, mean=model_cfg.mean or (0.0, 0.0, 0.0), std=model_cfg.std or (1.0, 1.0, 1.0))
    else:
        model = _build_timm_model(model_cfg, initial_weights)
    if model_cfg.trainable_blocks:
        freeze_early_blocks(model, model_cfg)
    return model


@torch.no_grad()
def start_head_neutral(model: PatchClassifier, positive_share: float) -> None:
    """Zero the fresh head's weights and set its bias to the log-odds of the training prior, so the first
    prediction is the prior for every patch and the first loss is the prior's entropy (ln 2 on balanced data).

    Inits scaled for 1,000 classes (timm's EfficientNet: U(±1/sqrt(classes)) over 1,280 features) otherwise start
    one logit at ±10–20 and the first epochs are spent undoing it, dragging the pretrained backbone along.
    """
    head = _head_module(model.net)
    head = head[-1] if isinstance(head, nn.Sequential) else head     # an MLP head (set_frozen_head): its last layer
    share = min(max(positive_share, 1e-4), 1 - 1e-4)
    head.weight.zero_()
    if head.bias is not None:
        head.bias.fill_(float(torch.logit(torch.tensor(share, dtype=torch.float64))))


def _build_timm_model(model_cfg: ModelConfig, initial_weights: bool = True) -> PatchClassifier:
    """A timm backbone by registry or hub name, with the config's options and timm_kwargs, its weights from the hub
    (or its cache) or from `model.pretrained_file`; normalised with its own mean/std unless the config sets them."""
    import timm

    weights_file = Path(model_cfg.pretrained_file) if model_cfg.pretrained_file else None
    source = timm_source(model_cfg.name, weights_file)
    options = {"num_classes": 1, "drop_rate": model_cfg.dropout}
    if model_cfg.drop_path:
        options["drop_path_rate"] = model_cfg.drop_path
    options.update(GLOBAL_POOL_OPTIONS[model_cfg.global_pool])
    options.update(resolved_timm_kwargs(model_cfg.timm_kwargs))
    if not initial_weights or (not model_cfg.pretrained and weights_file is None):
        net = create_timm_model(model_cfg, source, options, pretrained=False)
    elif weights_file is not None and not is_hub_name(model_cfg.name):
        net = create_timm_model(model_cfg, source, options, pretrained=False)   # the kit's own strict loader: timm
        load_backbone_weights(net, model_cfg.name, weights_in(weights_file))    # weights or a kit best.pt
    else:
        net = pretrained_timm_model(model_cfg, source, options, weights_file)
    data_config = timm.data.resolve_data_config({}, model=net)   # the model's pretrained config (a hub model's own)
    model = PatchClassifier(net, mean=model_cfg.mean or data_config["mean"], std=model_cfg.std or data_config["std"],
                            input_size=model_input_size(model_cfg, net))
    if model.input_size and not model_cfg.input_size:
        model.notes.append(f"model.input_size 0: `{model_cfg.name}` takes only {model.input_size}×{model.input_size} "
                           f"input (a fixed size), so the 96 px patches are resized to {model.input_size} on the device")
    return model


def pretrained_timm_model(model_cfg: ModelConfig, source: str, options: dict, weights_file: Path | None) -> nn.Module:
    """timm's own loader (the family's checkpoint filter, its classifier swap, position embeddings resized), from
    the hub or its cache, or for a hub model from `model.pretrained_file`; then checked for keys it left out when the
    architecture is not timm's registry default (a hub model, or timm_kwargs), which timm alone would let pass."""
    overlay = {"source": "", "file": str(weights_in(weights_file))} if weights_file is not None else None
    try:
        with timm_load_report() as left_out:
            net = create_timm_model(model_cfg, source, options, pretrained=True, overlay=overlay)
    except KitError:
        raise
    except Exception as err:   # the hub unreachable (no internet), no local cache entry, a gated model, …
        if overlay is not None:
            raise KitError(f"config `model.pretrained_file`: cannot load {overlay['file']} into `{model_cfg.name}` "
                           f"({type(err).__name__}: {first_line(err, 'no details')})") from None
        if is_hub_name(model_cfg.name):
            raise KitError(hub_problem(model_cfg.name, err, "its weights")) from None
        raise KitError(f"cannot load pretrained weights for `{model_cfg.name}` ({type(err).__name__}: "
                       f"{first_line(err, 'no details')}); without internet, set "
                       f"model.pretrained_file=path/to/weights"
                       f".safetensors (e.g. a Kaggle dataset of timm weights) or model.pretrained=false") from None
    if is_hub_name(model_cfg.name) or model_cfg.timm_kwargs:
        check_nothing_left_out(net, model_cfg.name, left_out, overlay["file"] if overlay else "")
    return net


@contextmanager
def timm_load_report():
    """The backbone keys timm's pretrained loader reports it left out, {"missing": [...], "unexpected": [...]}.
    timm loads non-strictly whenever the class count differs (always here: one logit) and only logs what did not fit,
    so a foundation model built without its card's arguments (LayerScale's init_values) would train half-loaded."""
    logger = logging.getLogger("timm.models._builder")
    report = {"missing": [], "unexpected": []}

    class Catch(logging.Handler):
        def emit(self, record):
            found = re.match(r"(Missing|Unexpected) keys \((.*?)\) (discovered|found) while loading", record.getMessage())
            if found:
                report[found[1].lower()] += found[2].split(", ")

    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)            # "Missing keys" is an info line
    try:
        yield report
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_nothing_left_out(net: nn.Module, name: str, left_out: dict, weights_file: str = "") -> None:
    """Refuse pretrained weights that timm loaded only in part (the fresh classifier excepted), naming the keys."""
    head = classifier_parameter_names(net)
    missing = [key for key in left_out["missing"] if key not in head]
    unexpected = left_out["unexpected"]
    if missing or unexpected:
        parts = [f"{label}: {', '.join(keys[:4])}" + (f" … ({len(keys)} in all)" if len(keys) > 4 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        weights = f"config `model.pretrained_file`: {weights_file}" if weights_file else \
            f"config `model.name: {name}`: its pretrained weights"
        raise KitError(f"{weights} do not fit the model built ({'; '.join(parts)}); its card's timm.create_model "
                       f"arguments go in model.timm_kwargs (e.g. init_values: 1.0e-5 for LayerScale weights)")


def model_input_size(model_cfg: ModelConfig, net: nn.Module) -> int:
    """What PatchClassifier resizes to: `model.input_size`, or for a model that takes one size only (a ViT built
    with dynamic_img_size=False) that size when `model.input_size` is 0; another size for such a model is refused."""
    fixed = fixed_input_size(net)
    if not fixed or model_cfg.input_size in (0, fixed):
        return model_cfg.input_size or fixed
    raise KitError(f"config `model.input_size: {model_cfg.input_size}`: `{model_cfg.name}` takes only {fixed}×{fixed} "
                   f"input; set model.input_size={fixed} (or 0, its own), or build it for another size "
                   f"(model.timm_kwargs: {{dynamic_img_size: true}} where the family has it)")


def fixed_input_size(net: nn.Module) -> int:
    """The one input size a timm model accepts (a ViT's patch embedding with a strict size and no dynamic size:
    positional embeddings for one grid), or 0 when any size goes (CNNs, dynamic_img_size ViTs)."""
    patch_embed = getattr(net, "patch_embed", None)
    if not getattr(patch_embed, "strict_img_size", False) or getattr(net, "dynamic_img_size", False):
        return 0
    height, width = patch_embed.img_size
    if height != width:
        raise KitError(f"`{type(net).__name__}` takes {height}×{width} input only; the kit resizes to squares: build it "
                       f"square (model.timm_kwargs: {{img_size: {height}}}) or with dynamic_img_size: true")
    return int(height)


# ----------------------------------------------------------------------------------------------------------------
# Hub models (hf-hub:org/name) and timm_kwargs
# ----------------------------------------------------------------------------------------------------------------

HUB_PREFIX = "hf-hub:"
HUB_NAME = re.compile(r"hf-hub:([\w.-]+/[\w.-]+)(?:@([\w./-]+))?")
# The files a hub model's folder may hold its weights in (what timm reads from the hub), preferred first.
HUB_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_name(name: str) -> bool:
    return name.startswith(HUB_PREFIX)


def timm_source(name: str, weights_file: Path | None) -> str:
    """What `timm.create_model` is given: a registry name as is; a hub name as is once its config.json (architecture,
    arguments, mean/std) is found in the local Hugging Face cache or on the hub; or, when `model.pretrained_file`
    brings that config.json along (a folder of the model's files, or one beside the weights file),
    `local-dir:<folder>`, which needs neither."""
    import timm

    if not is_hub_name(name):
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else "; `timm.list_models('*name*')` lists names"
            raise KitError(f"config `model.name`: unknown model `{name}` (baseline, a timm name or "
                           f"hf-hub:org/name){hint}")
        return name
    if not HUB_NAME.fullmatch(name):
        raise KitError(f"config `model.name: {name}`: a hub model is named hf-hub:org/name (or hf-hub:org/name@revision)")
    if weights_file is not None:
        folder = weights_file if weights_file.is_dir() else weights_file.parent
        if (folder / "config.json").is_file():
            return f"local-dir:{folder}"
    hub_config_file(name)
    return name


def hub_config_file(name: str) -> Path:
    """A hub model's config.json, from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME) or the hub (with the
    user's own token for a gated model: HF_TOKEN or `hf auth login`; the kit never reads or stores it)."""
    from huggingface_hub import hf_hub_download

    repo, revision = HUB_NAME.fullmatch(name).groups()
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception as err:
        raise KitError(hub_problem(name, err, "its config.json (the architecture)")) from None


def hub_problem(name: str, err: Exception, wanted: str) -> str:
    """One line for each way a hub model's `wanted` file cannot be had: gated, unknown or private, not cached and
    offline or out of reach, absent from the repository."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (  # names every huggingface_hub since 0.23 has (Kaggle's may be older than ours)
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = HUB_NAME.fullmatch(name).group(1)
    start = f"config `model.name: {name}`"
    if isinstance(err, GatedRepoError):
        return (f"{start}: a gated model: ask for access on https://huggingface.co/{repo} with your account, then "
                f"give your own token (HF_TOKEN in the environment, or `hf auth login`); the kit never stores it")
    if isinstance(err, RevisionNotFoundError):
        return f"{start}: the hub has no such revision of {repo}"
    if isinstance(err, RepositoryNotFoundError):
        return (f"{start}: no such model on the Hugging Face hub, or a private one your token (HF_TOKEN, `hf auth "
                f"login`) cannot see; check https://huggingface.co/{repo}")
    offline_route = (f"without internet (a Kaggle notebook), attach a dataset holding the model and set "
                     f"model.pretrained_file=/kaggle/input/<dataset> (its config.json and weights, as `hf download "
                     f"{repo} --local-dir <folder>` writes them), or point HF_HUB_CACHE at a Hugging Face cache "
                     f"holding it, with HF_HUB_OFFLINE=1")
    if isinstance(err, LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE=1 keeps the hub out of reach" if constants.HF_HUB_OFFLINE else
               f"the hub is out of reach ({first_line(err, 'no details')})")
        return f"{start}: {wanted} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; {offline_route}"
    if isinstance(err, EntryNotFoundError):        # on the hub, not in the repository
        return f"{start}: {repo} on the hub lacks {wanted}: timm reads a hub model from config.json and its weights"
    return f"{start}: cannot load {wanted} ({type(err).__name__}: {first_line(err, 'no details')}); {offline_route}"


def weights_in(path: Path) -> Path:
    """`model.pretrained_file` itself, or for a folder (a hub model's files) the weights file in it."""
    if not path.is_dir():
        return path
    found = [path / name for name in HUB_WEIGHTS_FILES if (path / name).is_file()]
    if not found:
        raise KitError(f"config `model.pretrained_file`: {path} is a folder without {' or '.join(HUB_WEIGHTS_FILES)}; "
                       f"point at the weights file itself")
    return found[0]


def resolved_timm_kwargs(values: dict) -> dict:
    """`model.timm_kwargs` as timm takes them: each dotted timm./torch. name imported (mlp_layer:
    timm.layers.SwiGLUPacked → the class), every other value as written."""
    import importlib

    resolved = {}
    for key, value in values.items():
        if isinstance(value, str) and DOTTED_NAME.fullmatch(value) and value.startswith(TIMM_OBJECT_PREFIXES):
            module_name, _, attribute = value.rpartition(".")
            try:
                value = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError):
                raise KitError(f"config `model.timm_kwargs.{key}: {value}`: no such object in this "
                               f"{module_name.split('.')[0]}") from None
        resolved[key] = value
    return resolved


# timm keyword → the config key that sets it (a family that lacks one is named with the key to change)
TIMM_OPTION_KEYS = {"drop_rate": ("model.dropout", "0"), "drop_path_rate": ("model.drop_path", "0"),
                    "global_pool": ("model.global_pool", '""')}


def create_timm_model(model_cfg: ModelConfig, source: str, options: dict, pretrained: bool,
                      overlay: dict | None = None) -> nn.Module:
    """`timm.create_model(source, …)` with the config's options; an option the family's constructor does not take
    (DenseNet has no stochastic depth: no `drop_path_rate`) is one line naming the config key to change."""
    import timm

    try:
        return timm.create_model(source, pretrained=pretrained, pretrained_cfg_overlay=overlay, **options)
    except TypeError as err:
        refused = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if refused is None:
            raise
        if refused.group(1) in model_cfg.timm_kwargs:
            raise KitError(f"config `model.timm_kwargs.{refused.group(1)}`: `{model_cfg.name}` takes no such "
                           f"argument; drop it") from None
        if refused.group(1) not in TIMM_OPTION_KEYS:
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
                       f"use weights saved from the same architecture (with its timm.create_model arguments in "
                       f"model.timm_kwargs)")
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
