"""timm backbones: `timm.create_model` with the config's options and `model.timm_kwargs`, by registry name or hub name
(kit/hub.py), and their weights (timm's loader from the hub or its cache, or a local file) checked key by key; the
mean/std and input size a backbone asks for.

timm is imported where it is used: the seed's CNNs (kit/models.py) never need it.
"""

from __future__ import annotations

import difflib
import logging
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .config import DOTTED_NAME, TIMM_OBJECT_PREFIXES, ModelConfig
from .errors import KitError, first_line
from .hub import cached_hub_weights, hub_config_file, hub_model_folder, hub_problem, hub_repo, is_hub_name, weights_in

# timm keyword → the config key that sets it (a family that lacks one is named with the key to change)
TIMM_OPTION_KEYS = {"drop_rate": ("model.dropout", "0"), "drop_path_rate": ("model.drop_path", "0"),
                    "global_pool": ("model.global_pool", '""')}
LISTED_KEYS = 4                  # keys named per kind in a "do not fit" line; the count says how many more


def build_backbone(model_cfg: ModelConfig, options: dict, initial_weights: bool = True) -> nn.Module:
    """A timm backbone by registry or hub name with the kit's `options` (one logit, dropout, pooling) and the
    config's timm_kwargs; its weights from the hub (or its cache) or from `model.pretrained_file`, unless
    `initial_weights` is False (the architecture only, for a best.pt loaded next)."""
    weights_file = Path(model_cfg.pretrained_file) if model_cfg.pretrained_file else None
    source = timm_source(model_cfg.name, weights_file)
    options = {**options, **resolved_timm_kwargs(model_cfg.timm_kwargs)}
    if not initial_weights or (not model_cfg.pretrained and weights_file is None):
        return create_timm_model(model_cfg, source, options, pretrained=False)
    if weights_file is not None and not is_hub_name(model_cfg.name):
        net = create_timm_model(model_cfg, source, options, pretrained=False)   # the kit's own strict loader: timm
        load_backbone_weights(net, model_cfg.name, weights_in(weights_file))    # weights or a kit best.pt
        return net
    return pretrained_timm_model(model_cfg, source, options, weights_file)


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
    hub_repo(name)                                  # an invalid hub name is refused before any file is looked for
    folder = hub_model_folder(weights_file)
    if folder is not None:
        return f"local-dir:{folder}"
    hub_config_file(name)
    return name


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


# ----------------------------------------------------------------------------------------------------------------
# Pretrained weights: timm's loader (hub, cache, a hub model's files) or the kit's strict one (a local file)
# ----------------------------------------------------------------------------------------------------------------

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
        # a file that was read but did not fit: torch says only "Error(s) in loading state_dict for …:"
        weights = Path(overlay["file"]) if overlay else None
        if weights is None and is_hub_name(model_cfg.name):
            weights = cached_hub_weights(model_cfg.name)
        unfit = weights_mismatch_on_meta(model_cfg, source, options, weights) if weights else {}
        if unfit:
            raise unfit_weights_error(f"{weights_description(model_cfg.name, overlay, weights)} do not fit the "
                                      f"model built", unfit) from None
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
        head = classifier_parameter_names(net)
        unfit = {"missing": [key for key in left_out["missing"] if key not in head],
                 "unexpected": left_out["unexpected"]}
        if any(unfit.values()):
            raise unfit_weights_error(f"{weights_description(model_cfg.name, overlay)} do not fit the model built",
                                      unfit)
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


def weights_mismatch_on_meta(model_cfg: ModelConfig, source: str, options: dict, weights_file: Path) -> dict:
    """Why timm could not load `weights_file`, key by key (`weights_mismatch`), against the architecture built on
    the meta device (shapes without memory); {} when every key fits or the file cannot be read: the cause lies
    elsewhere."""
    import timm

    try:
        with torch.device("meta"):
            net = create_timm_model(model_cfg, source, options, pretrained=False)
        return weights_mismatch(net, timm.models.load_state_dict(str(weights_file), weights_only=True))
    except Exception:
        return {}


def weights_mismatch(net: nn.Module, found: dict) -> dict:
    """The backbone keys of `net` that `found` (a state dict) lacks, has in excess, or holds in another shape (the
    classifier aside: ours is fresh, with one output); only the kinds that occur."""
    expected = backbone_tensors(net, net.state_dict())
    backbone = backbone_tensors(net, found)
    kinds = {"missing": [k for k in expected if k not in backbone],
             "unexpected": [k for k in backbone if k not in expected],
             "wrong shape": [k for k in expected if k in backbone and backbone[k].shape != expected[k].shape]}
    return {kind: keys for kind, keys in kinds.items() if keys}


def backbone_tensors(net: nn.Module, state_dict: dict) -> dict:
    """`state_dict` without `net`'s classifier (whatever its class count: a checkpoint's 1,000-class head too)."""
    head_prefixes = tuple(name.rsplit(".", 1)[0] + "." for name in classifier_parameter_names(net))
    return {k: v for k, v in state_dict.items() if not k.startswith(head_prefixes)}


def weights_description(name: str, overlay: dict | None, weights_file: Path | None = None) -> str:
    if overlay is not None:
        return f"config `model.pretrained_file`: {overlay['file']}"
    cached = f" ({weights_file})" if weights_file else ""
    return f"config `model.name: {name}`: its pretrained weights{cached}"


def unfit_weights_error(what: str, unfit: dict) -> KitError:
    """`what` (the weights, and what they do not fit) with the first keys of each kind and their count, and where
    the fix goes."""
    parts = [f"{kind}: {', '.join(keys[:LISTED_KEYS])}" + (f" … ({len(keys)} in all)" if len(keys) > LISTED_KEYS
                                                          else "") for kind, keys in unfit.items() if keys]
    return KitError(f"{what} ({'; '.join(parts)}); use weights of this architecture, with its card's "
                    f"timm.create_model arguments in model.timm_kwargs (e.g. init_values: 1.0e-5 for LayerScale "
                    f"weights)")


def load_backbone_weights(net: nn.Module, name: str, weights_file: Path) -> None:
    """Load every backbone tensor from a local file; the classifier stays fresh (ours has one output).

    Reads what timm reads (.pth, .safetensors, {"state_dict": …} checkpoints) and a kit checkpoint (best.pt).
    Any backbone key missing, unexpected or of another shape is refused, naming the keys.
    """
    import timm

    if not weights_file.is_file():
        raise KitError(f"config `model.pretrained_file`: {weights_file} not found")
    try:
        found = timm.models.load_state_dict(str(weights_file), weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
            raise KitError(f"config `model.pretrained_file`: {weights_file} holds pickled Python objects besides "
                           f"tensors, which the kit never loads (unpickling can run code): save the weights alone, "
                           f"torch.save(model.state_dict(), path) or a .safetensors file") from None
        raise KitError(f"config `model.pretrained_file`: cannot read {weights_file} ({type(err).__name__}: "
                       f"{first_line(err, 'no details')})") from None
    if found and all(k.startswith("net.") or k in ("mean", "std") for k in found):   # a kit checkpoint
        found = {k[len("net."):]: v for k, v in found.items() if k.startswith("net.")}
    unfit = weights_mismatch(net, found)
    if unfit:
        raise unfit_weights_error(f"config `model.pretrained_file`: {weights_file} does not fit `{name}`", unfit)
    net.load_state_dict(backbone_tensors(net, found), strict=False)


def classifier_parameter_names(net: nn.Module) -> set[str]:
    """Names (in `net.named_parameters()`) of the layer that produces the logit: timm's `get_classifier()`, which
    the seed's CNNs offer too."""
    head_ids = {id(p) for p in net.get_classifier().parameters()}
    return {name for name, p in net.named_parameters() if id(p) in head_ids}


# ----------------------------------------------------------------------------------------------------------------
# What a backbone asks of its input: mean/std, and a size for the models that take one only
# ----------------------------------------------------------------------------------------------------------------

def pretrained_mean_std(net: nn.Module) -> tuple:
    """The mean and std the backbone's pretrained config names (ImageNet's for timm's weights, a hub model's own)."""
    import timm

    data_config = timm.data.resolve_data_config({}, model=net)
    return data_config["mean"], data_config["std"]


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
