"""Experiment configuration: the schema, YAML loading, `key=value` overrides, and errors that name the key.

A config is plain data (nested dataclasses). Defaults live here; a YAML file in `configs/` overrides them;
`key=value` pairs on the command line override the file (dotted keys reach nested sections, e.g.
`optimizer.lr=3e-4`). Every key and value is checked, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .errors import KitError, first_line
from .io import atomic_write_text

# The shipped configs: the checkout's configs/ (or an unpacked bundle's); in an installed package (`pip install .`)
# the copy that travels inside it, kit/configs.
CONFIGS_DIR = next((folder for folder in (Path(__file__).resolve().parent.parent / "configs",
                                          Path(__file__).resolve().parent / "configs") if folder.is_dir()),
                   Path(__file__).resolve().parent.parent / "configs")


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------

# The names each choice field allows, and what implements them under the same names (tests/test_config.py checks
# that the two sets are equal).
DEVICES = ("auto", "cpu", "cuda")                    # device: kit/device.py select_device
AMP_CHOICES = ("auto", "bf16", "fp16")               # amp_dtype: by the card, or one forced (kit/device.py AMP_DTYPES)
GLOBAL_POOLS = ("", "avg", "max", "avgmax", "catavgmax")   # model.global_pool: timm's ("" = the model's own;
                                                     # catavgmax = fast.ai's concat pooling): models.GLOBAL_POOL_OPTIONS
OPTIMIZERS = ("adam", "adamw", "sgd")                # optimizer.name: kit/recipe.py OPTIMIZER_CLASSES
SCHEDULES = ("constant", "cosine", "onecycle")       # schedule.name: kit/recipe.py SCHEDULE_FACTORS
EXTENSIBLE_SCHEDULES = ("constant", "cosine")        # can run past their planned end when `epochs` is raised
LOSSES = ("bce", "focal")                            # loss.name: kit/recipe.py LOSS_FUNCTIONS
INPUT_PATHS = ("auto", "batch", "albumentations")    # train.input: kit/augment.py choose_input
FROZEN_HEADS = ("linear", "mlp")                     # train.frozen_head: kit/models.py FROZEN_HEAD_BUILDERS
TTA_VIEWS = ("d4", "flip4", "hflip", "none")         # tta.views: kit/inference.py TTA_TRANSFORMS
WANDB_MODES = ("online", "offline")                  # log.wandb.mode: kit/tracking.py WANDB_START_HINTS
CHOICES = {"device": DEVICES, "amp_dtype": AMP_CHOICES, "model.global_pool": GLOBAL_POOLS, "optimizer.name": OPTIMIZERS,
           "schedule.name": SCHEDULES, "loss.name": LOSSES, "train.input": INPUT_PATHS, "train.frozen_head": FROZEN_HEADS,
           "tta.views": TTA_VIEWS, "log.wandb.mode": WANDB_MODES}


def histology_augmentation() -> list[dict]:
    """The kit's default: D4 (the tissue has no orientation), a mild affine, and stain/colour jitter."""
    return [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "RandomRotate90", "p": 0.5},
        {"name": "Transpose", "p": 0.5},
        {"name": "Affine", "rotate": [-15, 15], "scale": [0.9, 1.1], "translate_percent": [-0.03, 0.03],
         "border_mode": 4, "p": 0.5},
        {"name": "HueSaturationValue", "hue_shift_limit": 10, "sat_shift_limit": 15, "val_shift_limit": 10, "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5},
    ]


@dataclass
class FoldsConfig:
    n_splits: int = 5            # stratified k-fold; every fold of an experiment reuses the same split file
    seed: int = 42               # split seed: change it to get a different partition of the same data
    groups_csv: str = ""         # id → group (e.g. the PCam slide of each patch): folds never split a group


@dataclass
class ModelConfig:
    # "baseline_bn" (the default) = the seed notebook's CNN with BatchNorm (learns on every seed); "baseline" = the
    # seed's CNN, faithfully (stalls on some seeds); any other name is a timm model
    # A timm name may be a hub model, `hf-hub:org/name` (the local Hugging Face cache, or the network).
    name: str = "baseline_bn"
    pretrained: bool = False     # timm: start from pretrained weights (timm's loader: the hub or its local cache)
    # timm: weights from a local .pth/.safetensors/.bin (Kaggle without internet); for a hub name, a folder holding the
    # model's config.json and weights (a `hf download` of it), or a weights file with its config.json beside it
    pretrained_file: str = ""
    dropout: float = 0.5         # before the last layer (the seed's Dropout(0.5); timm's drop_rate)
    drop_path: float = 0.0       # timm: stochastic depth, for the deeper backbones
    input_size: int = 0          # timm: resize the 96 px patch to this on the device (e.g. 224, as the best public
                                 # solutions did for ImageNet backbones; ~5× the compute); 0 = 96 as is
    global_pool: str = ""        # timm: avg | max | avgmax | catavgmax (fast.ai's concat pooling); "" = the model's
                                 # own (timm 1.0.31 offers no GeM)
    # timm: more keyword arguments for timm.create_model (what a foundation model's card asks for, e.g.
    # init_values: 1.0e-5); a dotted name under timm. or torch. becomes that object (mlp_layer: timm.layers.SwiGLUPacked)
    timm_kwargs: dict = field(default_factory=dict)
    mean: list = field(default_factory=list)   # input normalisation (RGB, on [0, 1]); [] = the model's own (its
    std: list = field(default_factory=list)    # pretrained config: ImageNet's, or a pathology model's stain means)
    trainable_blocks: int = 0    # timm: train only the last N blocks (a ViT's blocks, a CNN's stages) and the head,
                                 # the rest of the backbone frozen; 0 = all train


@dataclass
class OptimizerConfig:
    name: str = "adam"           # adam | adamw | sgd
    lr: float = 1e-3             # the head's learning rate (the seed's Adam default)
    backbone_lr_scale: float = 1.0   # backbone lr = lr × this (e.g. 0.1: pretrained features move slowly)
    # layer-wise lr decay (BEiT, timm): each backbone layer's lr × layer_decay^(layers above it), on top of
    # backbone_lr_scale; the head stays at lr. For ViTs (e.g. 0.75); 0 = off
    layer_decay: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9        # sgd only
    grad_clip: float = 0.0       # clip the gradient norm to this; 0 = off


@dataclass
class ScheduleConfig:
    name: str = "constant"       # constant (the seed) | cosine (after a linear warm-up) | onecycle; all per step
    warmup_epochs: float = 0.0   # constant/cosine: linear warm-up from lr/100, in epochs (fractions allowed)
    min_lr: float = 0.0          # cosine floor
    pct_start: float = 0.25      # onecycle: share of the steps spent rising to lr


@dataclass
class LossConfig:
    name: str = "bce"            # bce | focal (down-weights easy patches)
    pos_weight: float = 1.0      # bce: weight of positives; 1.47 = the real set's negatives/positives
    focal_gamma: float = 2.0
    focal_alpha: float = -1.0    # focal: weight of positives in [0, 1]; -1 = none
    label_smoothing: float = 0.0  # targets 0/1 → ε/2, 1-ε/2


@dataclass
class TrainConfig:
    ema_decay: float = 0.0       # keep an exponential moving average of the weights (e.g. 0.999); 0 = off
    early_stopping: int = 0      # stop after this many epochs without a better val AUC; 0 = off
    freeze_backbone_epochs: int = 0   # train only the head for the first N epochs (pretrained backbones)
    channels_last: bool = True   # NHWC memory layout: faster convolutions on GPUs with tensor cores
    # How training images reach the model. batch: uint8 batches gathered from the cache (held in GPU memory when it
    # fits) and augmented a batch at a time on the device, no DataLoader (fast: per-image Python costs more than a
    # 96×96 forward pass). albumentations: per image in DataLoader workers (any albumentations transform).
    # auto: batch when every augment.train transform has a batch equivalent (kit/augment.py), else albumentations.
    input: str = "auto"
    compile: bool = False        # torch.compile the training model: faster GPU steps after a minute of compiling
    # Under DDP (NPROC > 1, GPUs only): BatchNorm statistics over the whole batch instead of each GPU's share.
    sync_bn: bool = False
    # Stochastic weight averaging over the last N epochs (torch.optim.swa_utils), BatchNorm statistics recomputed on
    # the training images at the end; the average becomes best.pt. 0 = off.
    swa_epochs: int = 0
    # Frozen features (kit/features.py, pretrained timm backbones): the backbone runs once per image and TTA view,
    # its pooled features are cached beside the image cache, and each fold trains only the head on them (seconds).
    frozen_features: bool = False
    frozen_head: str = "linear"  # linear (logistic regression) | mlp (one hidden layer): what fills the classifier slot


@dataclass
class AugmentConfig:
    # albumentations transforms by class name, with their parameters; applied to uint8 RGB 96×96 patches.
    # Default: D4 + mild affine + stain jitter (histology_augmentation above); configs/baseline.yaml carries the seed's recipe.
    train: list = field(default_factory=histology_augmentation)
    valid: list = field(default_factory=list)


@dataclass
class TTAConfig:
    # d4 = 8 views (flips × 90° rotations) | flip4 = 4 views (none, h, v, both flips) | hflip = 2 | none = 1 view
    views: str = "d4"


@dataclass
class WandbConfig:
    project: str = ""            # the W&B project; "" = W&B off
    mode: str = "online"         # online (needs `wandb login` or WANDB_API_KEY) | offline (files only: `wandb sync`)
    entity: str = ""             # the W&B team or user; "" = the account's default


@dataclass
class MlflowConfig:
    # file:///abs/path/mlruns (a file store) | http(s)://host:port (a server; credentials in MLFLOW_TRACKING_USERNAME
    # and MLFLOW_TRACKING_PASSWORD, never here: the config is saved in every fold); "" = MLflow off
    tracking_uri: str = ""
    experiment: str = ""         # the MLflow experiment; "" = the kit experiment's name


@dataclass
class LogConfig:
    # Experiment trackers (kit/tracking.py), each optional; rank 0 logs each fold as its own run, every epoch's
    # history.csv row and at the end metrics.json's numbers. They watch a run, never change it: turning one on or
    # off never blocks a resume.
    tensorboard: bool = False    # event files in each fold folder: `tensorboard --logdir runs/<experiment>`
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class Config:
    name: str = ""               # experiment name: run folder and submission file are named after it
    data_dir: str = "data"       # the Kaggle folder: train/, test/, train_labels.csv, sample_submission.csv
    out_dir: str = "runs"        # run folders (runs/<name>/fold<k>/), folds and the image cache live here
    cache_dir: str = ""          # the image cache elsewhere (e.g. each machine's local disk); "" = <out_dir>/cache
    submissions_dir: str = "submissions"
    seed: int = 42               # weights init, shuffling and augmentation
    epochs: int = 10
    batch_size: int = 32         # the seed's batch size
    eval_batch_size: int = 256
    num_workers: int = -1        # DataLoader workers (train.input albumentations); -1 = auto: 0 on CPU, up to 8 on GPU
    device: str = "auto"         # auto (GPU when there is one) | cpu | cuda
    amp: bool = True             # mixed precision on GPU: bf16 where the card has it (≥ 8.0), else fp16; not on CPU
    amp_dtype: str = "auto"      # auto (by the card) | bf16 | fp16: force one (bf16 is refused below 8.0)
    max_train_images: int = 0    # use only the first N training images (quick trials); 0 = all
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    log: LogConfig = field(default_factory=LogConfig)


# An experiment name is one path component: runs/<name>/ and submissions/<name>-<time>.csv stay inside their folders.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PLAIN_NAME_RULE = "letters, digits, '.', '_', '-', starting with a letter or digit, at most 100 characters"


def is_plain_name(text: str) -> bool:
    return bool(PLAIN_NAME.fullmatch(text))


def suggest_name(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")
    return cleaned[:100] or "my_experiment"


# (minimum, inclusive?) for numeric keys
MINIMUMS = {
    "epochs": (1, True), "batch_size": (1, True), "eval_batch_size": (1, True), "num_workers": (-1, True),
    "max_train_images": (0, True), "folds.n_splits": (2, True), "model.dropout": (0.0, True),
    "optimizer.lr": (0.0, False), "optimizer.weight_decay": (0.0, True), "optimizer.momentum": (0.0, True),
    "schedule.warmup_epochs": (0.0, True), "schedule.min_lr": (0.0, True), "schedule.pct_start": (0.0, False),
    "optimizer.backbone_lr_scale": (0.0, True), "optimizer.grad_clip": (0.0, True), "model.drop_path": (0.0, True),
    "loss.pos_weight": (0.0, False), "loss.focal_gamma": (0.0, True), "loss.label_smoothing": (0.0, True),
    "train.ema_decay": (0.0, True), "train.early_stopping": (0, True), "train.freeze_backbone_epochs": (0, True),
    "model.input_size": (0, True), "train.swa_epochs": (0, True), "optimizer.layer_decay": (0.0, True),
    "model.trainable_blocks": (0, True)}
MAXIMUMS = {key: 1.0 for key in ("model.dropout", "model.drop_path", "schedule.pct_start", "loss.focal_alpha",
                                 "loss.label_smoothing", "train.ema_decay", "optimizer.backbone_lr_scale",
                                 "optimizer.layer_decay")}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def resolve_config_path(path: str | Path) -> Path:
    """Find a config by path, or by name in the kit's configs/ folder (so it works from any directory)."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates += [CONFIGS_DIR / Path(path).name, CONFIGS_DIR / f"{Path(path).name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in CONFIGS_DIR.glob("*.yaml"))) or "none"
    raise KitError(f"config file not found: {path} (configs shipped with the kit: {available})")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults ← YAML file ← overrides; the experiment name defaults to the file's stem."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        config_path = resolve_config_path(path)
        source = str(path)
        try:
            values = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as err:
            raise KitError(f"{source}: not valid YAML ({first_line(err)})") from None
        if values is None:
            raise KitError(f"{source} is empty: start from configs/baseline.yaml")
        if not isinstance(values, dict):
            raise KitError(f"{source}: expected `key: value` lines at the top level, got {type(values).__name__}")
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        if "name" not in (overrides or {}):             # an override names it: the stem is not a name then
            values.setdefault("name", config_path.stem)
    config = _build(Config, values, prefix="", source=source)
    if overrides:
        config = apply_overrides(config, overrides)
    if not config.name:
        raise KitError(f"{source}: `name` is empty: give the experiment a name (it names runs and submissions)")
    return config


def parse_overrides(pairs: list[str]) -> dict:
    """`["epochs=3", "optimizer.lr=3e-4"]` → {"epochs": 3, "optimizer.lr": 0.0003} (values read as YAML)."""
    parsed = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise KitError(f"override {pair!r} is not key=value (e.g. epochs=3 or optimizer.lr=3e-4)")
        try:
            parsed[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            parsed[key.strip()] = text
    return parsed


def apply_overrides(config: Config, overrides: list[str] | dict) -> Config:
    """Return a new config with dotted-key overrides applied and checked like file values."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values = to_dict(config)
    for dotted_key, value in overrides.items():
        section = values
        parts = dotted_key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(section.get(part), dict):
                raise KitError(_unknown_key_message(".".join(parts[: depth + 1]), section, "override"))
            section = section[part]
        if parts[-1] not in section and ".".join(parts[:-1]) not in OPEN_SECTIONS:
            raise KitError(_unknown_key_message(dotted_key, section, "override", prefix=".".join(parts[:-1])))
        section[parts[-1]] = value
    return _build(Config, values, prefix="", source="override")


# Sections whose keys are timm's, not the kit's: an override may add one (`model.timm_kwargs.init_values=1e-5`)
OPEN_SECTIONS = ("model.timm_kwargs",)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    """Write the effective config as YAML (atomically), so a run folder says exactly what produced it."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def from_dict(values: dict, source: str = "saved config") -> Config:
    return _build(Config, values, prefix="", source=source)


# ----------------------------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------------------------

def _build(schema, values: dict, prefix: str, source: str):
    if not isinstance(values, dict):
        raise KitError(f"{source}: `{prefix.rstrip('.')}` must be a section of `key: value` lines")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in values:
        if key not in fields:
            raise KitError(_unknown_key_message(prefix + str(key), fields, source, prefix=prefix.rstrip(".")))
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key + ".", source)
        else:
            kwargs[name] = _check_value(key, value, hint, source)
    return schema(**kwargs)


def _check_value(key: str, value, hint, source: str):
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
                dict: "a section of `key: value` lines"}[hint]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):
        try:
            value = float(value)       # YAML reads `1e-3` (no dot) as a string
        except ValueError:
            pass
    if hint is str and value is None:
        value = ""
    if hint is dict and value is None:
        value = {}
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise KitError(f"{source}: `{key}` must be {expected}, got {value!r}")
    if key == "name" and value and not is_plain_name(value):
        raise KitError(f"{source}: experiment name {value!r} must be one folder name ({PLAIN_NAME_RULE}): it names "
                       f"runs/<name>/ and the submission file; e.g. name={suggest_name(value)}")
    options = CHOICES.get(key)
    if options is not None and value not in options:
        raise KitError(f"{source}: `{key}` must be one of {', '.join(options)}, got {value!r}")
    if key in MINIMUMS:
        minimum, inclusive = MINIMUMS[key]
        if value < minimum or (value == minimum and not inclusive):
            relation = "at least" if inclusive else "greater than"
            raise KitError(f"{source}: `{key}` must be {relation} {minimum}, got {value!r}")
    if key in MAXIMUMS and value > MAXIMUMS[key]:
        raise KitError(f"{source}: `{key}` must be at most {MAXIMUMS[key]}, got {value!r}")
    if key == "loss.focal_alpha" and value != -1 and value < 0:
        raise KitError(f"{source}: `loss.focal_alpha` must be in [0, 1], or -1 for none; got {value!r}")
    if key == "log.mlflow.tracking_uri" and urlsplit(value).password:
        raise KitError(f"{source}: `log.mlflow.tracking_uri` holds a password, which every fold's config.yaml and "
                       f"tracker run would keep: drop it from the URI and set MLFLOW_TRACKING_USERNAME and "
                       f"MLFLOW_TRACKING_PASSWORD instead")
    if key in ("model.mean", "model.std"):
        value = _check_channel_values(key, value, source)
    if key == "model.timm_kwargs":
        value = checked_timm_kwargs(value, source)
    return value


# model.timm_kwargs: a dotted name under one of these prefixes becomes the object it names; nothing else is imported
TIMM_OBJECT_PREFIXES = ("timm.", "torch.")
DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
# timm keywords the kit sets itself, and the key that sets each
KIT_TIMM_KEYWORDS = {"num_classes": "the kit (one logit per patch)", "drop_rate": "model.dropout",
                     "drop_path_rate": "model.drop_path", "global_pool": "model.global_pool",
                     "pretrained": "model.pretrained", "pretrained_cfg": "the model's own config",
                     "checkpoint_path": "model.pretrained_file", "cache_dir": "HF_HUB_CACHE"}


def checked_timm_kwargs(values: dict, source: str) -> dict:
    """`model.timm_kwargs` checked without importing anything (the config check needs no timm and no network):
    numbers YAML read as text (1e-5) become numbers, a dotted name must lie under timm. or torch., and the keys the
    kit sets itself are refused naming the key that sets them."""
    checked = {}
    for key, value in values.items():
        where = f"{source}: `model.timm_kwargs.{key}`"
        if key in KIT_TIMM_KEYWORDS:
            raise KitError(f"{where}: set by {KIT_TIMM_KEYWORDS[key]}, not here; drop it from model.timm_kwargs")
        if isinstance(value, str) and NUMBER.fullmatch(value):
            value = float(value)
        elif isinstance(value, str) and DOTTED_NAME.fullmatch(value) and not value.startswith(TIMM_OBJECT_PREFIXES):
            raise KitError(f"{where}: {value!r} names an object outside timm. and torch.; only those are imported "
                           f"(e.g. timm.layers.SwiGLUPacked, torch.nn.SiLU)")
        checked[str(key)] = value
    return checked


def _check_channel_values(key: str, value: list, source: str) -> list:
    """model.mean / model.std: empty (the model's own) or one number per RGB channel; a std above 0."""
    numbers = [float(v) for v in value if not isinstance(v, bool) and NUMBER.fullmatch(str(v).strip())]
    if value and (len(value) != 3 or len(numbers) != 3 or (key == "model.std" and min(numbers) <= 0)):
        rule = "three numbers above 0" if key == "model.std" else "three numbers"
        raise KitError(f"{source}: `{key}` must be [] (the model's own) or {rule}, one per RGB channel on [0, 1] "
                       f"input (e.g. [0.485, 0.456, 0.406]); got {value!r}")
    return numbers


def _unknown_key_message(key: str, known, source: str, prefix: str = "") -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(known), n=3)
    close += [name for name in known if name not in close and len(name) > 1 and (name in leaf or leaf in name)]
    qualified = [f"{prefix}.{name}" if prefix else name for name in close]
    hint = f"; did you mean {' or '.join(qualified)}?" if close else ""
    return f"{source}: unknown config key `{key}`{hint}"
