"""Augmentation from the config's list of `{name: Transform, param: value}` entries: albumentations pipelines, and
their batch equivalents (torch ops on a whole batch, on the device where the batch lives).

The label lives in the centre 32×32, so a geometric transform must not move that region away from the centre:
every pipeline is probed with a centre mask when it is built, and one that drifts is refused.

Batch augmentation is airbench's lesson: for 96×96 patches, per-image Python work costs more than the model, so the
transforms the kit uses (D4, a mild affine, stain/colour jitter, HEStain with preset stain matrices) also exist as
batch ops with each image's own random parameters. `choose_input` picks the batch path when every configured transform
has an equivalent.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F

try:                                    # the preset H&E stain matrices HEStain uses (moved into pixel/ after 2.0.5)
    from albumentations.augmentations.pixel.functional import STAIN_MATRICES
except ImportError:                     # albumentations 2.0.5
    from albumentations.augmentations.functional import STAIN_MATRICES

from .competition import CENTRE, CENTRE_SIZE, IMAGE_SIZE
from .device import to_device
from .errors import KitError

CENTRE_PROBES = 64              # random draws of the pipeline when checking it
MIN_CENTRE_OVERLAP = 2 / 3      # share of the output's centre 32×32 that must come from the input's centre


def build_transform(specs: list[dict], key: str, seed: int | None = None) -> A.Compose | None:
    """Compose the listed transforms (None when the list is empty: batches then skip per-image work)."""
    if not specs:
        return None
    transforms = []
    for position, spec in enumerate(specs):
        where = f"`{key}[{position}]`"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise KitError(f"config {where} must be a mapping with a `name`, e.g. {{name: HorizontalFlip, p: 0.5}}")
        params = {k: v for k, v in spec.items() if k != "name"}
        transform_class = getattr(A, spec["name"], None)
        if not isinstance(transform_class, type) or not issubclass(transform_class, A.BasicTransform):
            raise KitError(f"config {where}: `{spec['name']}` is not an albumentations transform "
                           f"(see https://albumentations.ai/docs/)")
        try:
            with warnings.catch_warnings():
                # albumentations only warns about an unknown parameter; here it is an error that names it
                warnings.filterwarnings("error", message=r"Argument\(s\) .* are not valid")
                transforms.append(transform_class(**params))
        except (TypeError, ValueError, UserWarning) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KitError(f"config {where} ({spec['name']}): bad parameters {spec}: {message}") from None
    transform = A.Compose(transforms, seed=seed)
    overlap = worst_centre_overlap(transform)
    if overlap < MIN_CENTRE_OVERLAP:
        raise KitError(f"config `{key}` moves the centre {CENTRE_SIZE}×{CENTRE_SIZE} (where the label lives): in the "
                       f"worst of {CENTRE_PROBES} draws only {overlap:.0%} of the output's centre comes from the "
                       f"input's centre; use milder shifts, scales or crops")
    return transform


def worst_centre_overlap(transform: A.Compose, probes: int = CENTRE_PROBES) -> float:
    """Over `probes` draws, the smallest share of the output's centre square that comes from the input's centre.

    The centre is tracked as a mask, so geometric transforms move it and colour transforms leave it alone.
    Runs on a copy with a fixed seed: the check is deterministic and the real pipeline's random state is untouched.
    """
    probe = copy.deepcopy(transform)
    probe.set_random_seed(0)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    centre_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    centre_mask[CENTRE, CENTRE] = 1
    worst = 1.0
    for _ in range(probes):
        moved = probe(image=image, mask=centre_mask)["mask"]
        worst = min(worst, float(moved[CENTRE, CENTRE].mean()))
    return worst


# ----------------------------------------------------------------------------------------------------------------
# Batch augmentation: the same transforms as torch ops on a whole batch
# ----------------------------------------------------------------------------------------------------------------
#
# A batch is (N, 3, H, W) pixel values 0..255, uint8 as gathered from the cache, float after the first op. Every
# image draws its own parameters, as albumentations would, from one CPU generator: an epoch's augmentations depend
# on its seed alone, on CPU and GPU alike, and the draws cost nothing next to the image work. Labels travel with the
# batch, because a D4 move regroups it (see apply_d4).

# A D4 element (the 8 flips/turns of a square) as 3 bits: transpose, then flip rows, then flip columns.
TRANSPOSE, VFLIP, HFLIP = 1, 2, 4
ROT90_ELEMENTS = (0, TRANSPOSE | VFLIP, VFLIP | HFLIP, TRANSPOSE | HFLIP)    # np.rot90(image, k) for k = 0, 1, 2, 3


def _d4_matrix(element: int) -> np.ndarray:
    """The element acting on (row, column) offsets from the centre."""
    transpose = np.array([[0, 1], [1, 0]]) if element & TRANSPOSE else np.eye(2)
    vflip = np.diag([-1, 1]) if element & VFLIP else np.eye(2)
    hflip = np.diag([1, -1]) if element & HFLIP else np.eye(2)
    return hflip @ vflip @ transpose


def _d4_then_table() -> torch.Tensor:
    matrices = [_d4_matrix(element) for element in range(8)]
    return torch.tensor([[next(e for e in range(8) if np.array_equal(matrices[e], matrices[second] @ matrices[first]))
                          for second in range(8)] for first in range(8)])


D4_THEN = _d4_then_table()     # D4_THEN[first, second]: the element that does `first`, then `second`


def apply_d4(images: torch.Tensor, labels: torch.Tensor, elements: torch.Tensor):
    """Move each image (N, C, H, W) by its D4 element (a CPU tensor) into a new float channels-last batch.

    The batch comes back grouped by element, `labels` reordered alongside: each group is then one strided copy
    that also converts to float, which is several times cheaper on CPU than moving images one place at a time.
    """
    order = torch.argsort(elements, stable=True)
    on_device = to_device(order, images.device)
    # a channels-last batch (as gathered from the cache) is contiguous as NHWC: select whole images there
    grouped = images.permute(0, 2, 3, 1).index_select(0, on_device).permute(0, 3, 1, 2)
    moved = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=torch.channels_last)
    start = 0
    for element, count in enumerate(torch.bincount(elements, minlength=8).tolist()):
        group = grouped[start:start + count]
        if element & TRANSPOSE:
            group = group.transpose(2, 3)
        if element & VFLIP:
            group = group.flip(2)
        if element & HFLIP:
            group = group.flip(3)
        moved[start:start + count].copy_(group)
        start += count
    return moved, labels.index_select(0, to_device(order, labels.device))


@dataclass
class D4Op:
    """HorizontalFlip, VerticalFlip, Transpose, RandomRotate90, D4: with probability p, one of `choices`."""
    p: float
    choices: tuple[int, ...]

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        picked = torch.rand(count, generator=generator, dtype=torch.float64) < self.p
        which = torch.randint(len(self.choices), (count,), generator=generator)
        return torch.where(picked, torch.tensor(self.choices)[which], 0)


@dataclass
class D4Run:
    """Consecutive D4 ops, fused: each image's elements are composed, then the batch moves once."""
    ops: list[D4Op]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        elements = torch.zeros(len(images), dtype=torch.long)
        for op in self.ops:
            elements = D4_THEN[elements, op.draw(len(images), generator)]
        return apply_d4(images, labels, elements)


def _uniform(value_range, u: torch.Tensor) -> torch.Tensor:
    low, high = value_range
    return low + (high - low) * u


class PixelOp:
    """A transform that computes new pixel values (float), applied to the images its probability p picks."""
    p: float
    draws = 1        # uniform numbers per image

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        count = len(images)
        picked = torch.rand(count, generator=generator, dtype=torch.float64) < self.p
        u = torch.rand(count, self.draws, generator=generator, dtype=torch.float64)   # drawn for every image
        rows = picked.nonzero().squeeze(1)
        if len(rows) == 0:
            return images, labels
        images = images.float() if images.dtype == torch.uint8 else images
        if len(rows) == count:
            return self.apply(images, u), labels
        rows_on_device = to_device(rows, images.device)
        images[rows_on_device] = self.apply(images.index_select(0, rows_on_device), u[rows])
        return images, labels


class AffineOp(PixelOp):
    """albumentations' Affine: scale, rotate, shear and translate about the centre, as one grid_sample per batch."""
    draws = 7
    MODES = {0: "nearest", 1: "bilinear", 2: "bicubic"}                   # cv2.INTER_NEAREST/LINEAR/CUBIC
    PADDING = {0: "zeros", 1: "border", 4: "reflection"}                  # cv2.BORDER_CONSTANT/REPLICATE/REFLECT_101

    def __init__(self, t: A.Affine):
        self.p, self.rotate, self.scale, self.keep_ratio, self.shear = t.p, t.rotate, t.scale, t.keep_ratio, t.shear
        self.translate_percent, self.translate_px = t.translate_percent, t.translate_px
        self.mode, self.padding, self.fill = self.MODES[t.interpolation], self.PADDING[t.border_mode], float(t.fill)

    def theta(self, u: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Per image, the affine_grid matrix mapping output to input, in grid_sample's [-1, 1] coordinates."""
        scale_x = _uniform(self.scale["x"], u[:, 0])
        scale_y = scale_x if self.keep_ratio else _uniform(self.scale["y"], u[:, 1])
        angle = torch.deg2rad(_uniform(self.rotate, u[:, 2]))
        shear_x = torch.deg2rad(-_uniform(self.shear["x"], u[:, 3]))           # albumentations negates the shear
        shear_y = torch.deg2rad(-_uniform(self.shear["y"], u[:, 4]))
        if self.translate_px is not None:                                     # whole pixels, bounds included
            shift_x = torch.floor(_uniform((self.translate_px["x"][0], self.translate_px["x"][1] + 1), u[:, 5]))
            shift_y = torch.floor(_uniform((self.translate_px["y"][0], self.translate_px["y"][1] + 1), u[:, 6]))
        else:                                                                 # a share of the size, truncated
            shift_x = torch.trunc(_uniform(self.translate_percent["x"], u[:, 5]) * width)
            shift_y = torch.trunc(_uniform(self.translate_percent["y"], u[:, 6]) * height)
        cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle), torch.ones_like(angle)

        def matrices(*rows):
            return torch.stack([torch.stack(row, -1) for row in rows], -2)

        # forward, on (x, y) offsets from the centre: shear · rotate · scale (albumentations' order), then shift
        forward = (matrices((one, torch.tan(shear_x)), (torch.tan(shear_y), one))
                   @ matrices((cos, sin), (-sin, cos)) @ matrices((scale_x, zero), (zero, scale_y)))
        inverse = torch.linalg.inv(forward)
        half = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)   # align_corners=True units
        linear = inverse * half.view(1, 1, 2) / half.view(1, 2, 1)
        offset = -(inverse @ torch.stack([shift_x, shift_y], -1).unsqueeze(-1)).squeeze(-1) / half
        return torch.cat([linear, offset.unsqueeze(-1)], -1).float()

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        theta = to_device(self.theta(u, images.shape[2], images.shape[3]), images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=True)
        moved = F.grid_sample(images - self.fill if self.fill else images, grid, mode=self.mode,
                              padding_mode=self.padding, align_corners=True)
        return (moved + self.fill if self.fill else moved).clamp_(0, 255)


class BrightnessContrastOp(PixelOp):
    """albumentations' RandomBrightnessContrast: pixel × (1 + contrast) + brightness × 255 (or × the image mean)."""
    draws = 2

    def __init__(self, t: A.RandomBrightnessContrast):
        self.p, self.contrast, self.brightness, self.by_max = t.p, t.contrast_limit, t.brightness_limit, \
            t.brightness_by_max

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        alpha = to_device((1 + _uniform(self.contrast, u[:, 0])).float(), images.device).view(-1, 1, 1, 1)
        beta = to_device(_uniform(self.brightness, u[:, 1]).float(), images.device).view(-1, 1, 1, 1)
        beta = beta * (255.0 if self.by_max else images.mean((1, 2, 3), keepdim=True))
        return (images * alpha + beta).clamp_(0, 255)


class HueSaturationValueOp(PixelOp):
    """albumentations' HueSaturationValue on OpenCV's HSV scale: hue shifted in 1/180 turns, saturation and value
    in 1/255 steps; grey pixels stay grey."""
    draws = 3

    def __init__(self, t: A.HueSaturationValue):
        self.p, self.hue, self.sat, self.val = t.p, t.hue_shift_limit, t.sat_shift_limit, t.val_shift_limit

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        def shift(limits, column, scale):
            return to_device((_uniform(limits, u[:, column]) / scale).float(), images.device).view(-1, 1, 1)

        return shift_hsv(images / 255, shift(self.hue, 0, 180), shift(self.sat, 1, 255), shift(self.val, 2, 255)) * 255


def shift_hsv(rgb: torch.Tensor, hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) in [0, 1] → HSV, hue + `hue` turns, saturation and value clipped to [0, 1], → RGB."""
    red, green, blue = rgb.unbind(1)
    high, low = rgb.amax(1), rgb.amin(1)
    chroma = high - low
    inverse_chroma = torch.where(chroma > 0, chroma.reciprocal(), 0)     # grey pixels: hue and saturation 0
    sector = torch.where(high == red, (green - blue).mul_(inverse_chroma),        # hue in sixths of a turn
                         torch.where(high == green, (blue - red).mul_(inverse_chroma).add_(2),
                                     (red - green).mul_(inverse_chroma).add_(4)))
    sector.add_(6 * hue).remainder_(6)
    sat = chroma.div_(high.clamp_min(1e-12))
    sat = torch.where(sat > 0, (sat + saturation).clamp_(0, 1), 0)
    val = (high + value).clamp_(0, 1)
    val_sat = val * sat
    shifted = torch.empty_like(rgb)
    # back: channel = V − V·S·clamp(min(k, 4 − k), 0, 1) with k = (n + sector) mod 6, n = 5, 3, 1 for R, G, B
    for channel, n in enumerate((5, 3, 1)):
        k = (sector + n).remainder_(6)
        torch.sub(val, torch.minimum(k, 4 - k).clamp_(0, 1).mul_(val_sat), out=shifted[:, channel])
    return shifted


class HEStainOp(PixelOp):
    """albumentations' HEStain with a preset stain matrix (one fixed, or random_preset: one of the presets drawn per
    image): RGB → optical density → haematoxylin and eosin concentrations, each scaled and shifted (in tissue only,
    unless augment_background) → back through the same matrix to RGB. The two mixings are a 2×3 and a 3×2 matrix
    product per image, batched; as in albumentations, pixels off the stain plane are projected onto it."""
    draws = 5                      # which preset, then H and E scales, then H and E shifts
    REGULARIZATION = 1e-6          # albumentations' ridge in the unmixing solve
    TISSUE_LUMINOSITY = 0.85       # albumentations' get_tissue_mask: tissue is darker than this (0..1)
    LUMA = (0.299, 0.587, 0.114)

    def __init__(self, t: A.HEStain):
        self.p, self.scale, self.shift = t.p, t.intensity_scale_range, t.intensity_shift_range
        self.augment_background = t.augment_background
        names = t.preset_names if t.method == "random_preset" else [t.preset]
        # the unmixing matrix (S Sᵀ + εI)⁻¹ S that albumentations' solve applies, computed once, in float64 from the
        # float32 stain matrix it uses
        stains = np.stack([STAIN_MATRICES[name] for name in names]).astype(np.float32)            # (presets, 2, 3)
        gram = stains.astype(np.float64) @ stains.transpose(0, 2, 1) + self.REGULARIZATION * np.eye(2)
        self.stains = torch.from_numpy(stains)
        self.unmixing = torch.from_numpy(np.linalg.solve(gram, stains.astype(np.float64))).float()

    def apply(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        which = (u[:, 0] * len(self.stains)).long().clamp_(max=len(self.stains) - 1)   # py_random.choice, uniform
        stains = to_device(self.stains[which], images.device)
        unmixing = to_device(self.unmixing[which], images.device)
        scale = to_device(_uniform(self.scale, u[:, 1:3]).float(), images.device).view(-1, 1, 2)
        shift = to_device(_uniform(self.shift, u[:, 3:5]).float(), images.device).view(-1, 1, 2)
        count, _, height, width = images.shape
        # pixels as rows of (R, G, B): a view of a channels-last batch (as gathered and as D4 leaves it), no copy
        rgb = images.permute(0, 2, 3, 1).reshape(count, height * width, 3) / 255
        density = rgb.clamp_min(1e-6).log_().neg_()                                     # optical density
        concentrations = torch.bmm(density, unmixing.transpose(1, 2))                   # (N, H·W, 2): H and E
        adjusted = concentrations * scale + shift
        if not self.augment_background:
            red, green, blue = rgb.unbind(2)
            luminosity = red * self.LUMA[0] + green * self.LUMA[1] + blue * self.LUMA[2]  # albumentations' order
            adjusted = torch.where((luminosity < self.TISSUE_LUMINOSITY).unsqueeze(2), adjusted, concentrations)
        stained = torch.bmm(adjusted, stains).neg_().exp_().clamp_(0, 1).mul_(255)      # back to RGB, 0..255
        return stained.reshape(count, height, width, 3).permute(0, 3, 1, 2)


class BatchAugmentation:
    """A config's transforms as batch ops, in config order; consecutive D4 ops move the batch once."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        """(N, 3, H, W) pixel values 0..255 (uint8, or float that may be changed in place) and their labels → the
        augmented batch (float unless nothing was applied), same scale, and the labels in its order."""
        for step in self.steps:
            images, labels = step(images, labels, generator)
        return images, labels


class NoBatchEquivalent(Exception):
    """A transform, or one of its parameters, that only albumentations implements."""


def _batch_op(t: A.BasicTransform):
    name = type(t).__name__
    if name in ("HorizontalFlip", "VerticalFlip", "Transpose", "RandomRotate90", "D4", "SquareSymmetry"):
        choices = {"HorizontalFlip": (HFLIP,), "VerticalFlip": (VFLIP,), "Transpose": (TRANSPOSE,),
                   "RandomRotate90": ROT90_ELEMENTS}.get(name, tuple(range(8)))
        return D4Op(t.p, choices)
    if name == "Affine":
        if t.fit_output or t.balanced_scale:
            raise NoBatchEquivalent("fit_output and balanced_scale have none")
        if t.interpolation not in AffineOp.MODES or t.border_mode not in AffineOp.PADDING:
            raise NoBatchEquivalent(f"interpolation {t.interpolation} / border_mode {t.border_mode}: "
                                    f"only interpolation 0, 1, 2 and border_mode 0, 1, 4 have one")
        if not isinstance(t.fill, (int, float)):
            raise NoBatchEquivalent("only a single number as `fill` has one")
        return AffineOp(t)
    if name == "RandomBrightnessContrast":
        if t.ensure_safe_range:
            raise NoBatchEquivalent("ensure_safe_range has none")
        return BrightnessContrastOp(t)
    if name == "HueSaturationValue":
        return HueSaturationValueOp(t)
    if name == "HEStain":
        if t.method not in ("preset", "random_preset"):
            raise NoBatchEquivalent(f"method {t.method} estimates a stain matrix per image, which only albumentations "
                                    f"does; method preset or random_preset has one")
        return HEStainOp(t)
    raise NoBatchEquivalent("no batch equivalent in kit/augment.py")


def batch_equivalent(transform: A.Compose | None, key: str) -> BatchAugmentation | None:
    """The batch version of a pipeline built by `build_transform` (None for none); NoBatchEquivalent names the first
    transform or parameter without one."""
    if transform is None:
        return None
    steps = []
    for position, t in enumerate(transform.transforms):
        try:
            op = _batch_op(t)
        except NoBatchEquivalent as reason:
            raise NoBatchEquivalent(f"`{key}[{position}]` {type(t).__name__}: {reason}") from None
        if isinstance(op, D4Op) and steps and isinstance(steps[-1], D4Run):
            steps[-1].ops.append(op)
        else:
            steps.append(D4Run([op]) if isinstance(op, D4Op) else op)
    return BatchAugmentation(steps)


@dataclass
class InputChoice:
    path: str                              # "batch" | "albumentations"
    augment: BatchAugmentation | None      # the batch pipeline (batch path; None = no augmentation)
    why: str                               # for the log line


def choose_input(requested: str, transform: A.Compose | None, key: str) -> InputChoice:
    """`train.input`: batch or albumentations as asked; auto = batch when every transform has a batch equivalent."""
    if requested == "albumentations":
        return InputChoice("albumentations", None, "train.input is albumentations")
    try:
        augment = batch_equivalent(transform, key)
    except NoBatchEquivalent as reason:
        if requested == "batch":
            raise KitError(f"config `train.input: batch`, but {reason}; use train.input=auto or albumentations") \
                from None
        return InputChoice("albumentations", None, str(reason))
    why = f"every `{key}` transform has a batch equivalent" if augment is not None else f"`{key}` is empty"
    return InputChoice("batch", augment, why if requested == "auto" else "train.input is batch")
