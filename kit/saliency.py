"""Where the model looks: class-activation maps of each patch's evidence for tumour (HiResCAM, from the `grad-cam`
package), and the share of that evidence inside the centre 32×32 that decides the label.

A patch is labelled by its centre 32×32 alone, so a model whose evidence lies in the outer ring has learned
something the labels do not say (the hard generated set plants tumour-like clusters outside the centre of half its
negatives). The maps explain the kit's one logit per image; `centre_share` turns them into one number, to read
against a flat map's `UNIFORM_CENTRE_SHARE` (32² / 96² ≈ 0.111). `centre_evidence` measures it over a finished
run: each fold's best.pt on a bounded sample of the patches it held out.

HiResCAM rather than Grad-CAM: Grad-CAM weighs each channel by its gradient averaged over the map, so in the seed
CNNs, whose dense layer weighs every position on its own, a blob detector lights up wherever a blob is, whether the
logit uses that position or not. HiResCAM multiplies gradient and activation position by position, which follows the
dense layer; on globally pooled networks (timm CNNs) the gradient is the same at every position and the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .batches import to_model_input
from .checkpoints import model_from_best
from .competition import CENTRE, CENTRE_SIZE, CHANNELS, IMAGE_SIZE, TRAIN_DIR
from .config import Config
from .data import image_paths, read_image
from .device import select_device
from .errors import KitError
from .metrics import DEFAULT_THRESHOLD
from .models import BASELINES, PatchClassifier
from .runs import BEST, fold_dir

UNIFORM_CENTRE_SHARE = CENTRE_SIZE ** 2 / IMAGE_SIZE ** 2     # 0.111: the share of a map that looks everywhere alike
SALIENCY_IMAGES = 64        # validation patches per fold behind the share: bounded, so a report stays cheap on a CPU
SAMPLE_SEED = 0             # which of a fold's patches are drawn: the same on every report of the same run
MAP_BATCH = 32              # images per pass (a forward and a backward)


class LogitColumn(nn.Module):
    """The kit's (N,) logits as the (N, 1) class scores grad-cam explains; class 0 is the tumour logit."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------------
# The layer a map is read from
# ----------------------------------------------------------------------------------------------------------------

def is_vision_transformer(net: nn.Module) -> bool:
    """A timm ViT (ViT, DeiT, EVA, BEiT, …): a stack of `blocks` over patch tokens after `num_prefix_tokens`."""
    blocks = getattr(net, "blocks", None)
    return (hasattr(net, "num_prefix_tokens") and isinstance(blocks, (nn.Sequential, nn.ModuleList))
            and len(blocks) > 0 and hasattr(blocks[-1], "norm1"))


def token_grid(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A reshape for grad-cam: a ViT's (N, tokens, C) → (N, C, rows, columns) over the patch grid, the class and
    register tokens (`net.num_prefix_tokens`) dropped."""
    prefix = int(net.num_prefix_tokens)
    grid = tuple(getattr(getattr(net, "patch_embed", None), "grid_size", None) or ())

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        count = patches.shape[1]
        rows, columns = grid if len(grid) == 2 and grid[0] * grid[1] == count else (math.isqrt(count),) * 2
        if rows * columns != count:
            raise KitError(f"{count} patch tokens after {prefix} prefix token(s) make no square grid; "
                           f"this ViT needs its own reshape (kit/saliency.py token_grid)")
        return patches.reshape(len(patches), rows, columns, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def last_spatial_module(net: nn.Module, input_size: int) -> nn.Module:
    """The last module to finish with an (N, C, H, W) output larger than 1×1: the feature map the pooling reads
    (timm's ResNet `layer4`, EfficientNet `bn2` after its 1×1 head convolution, ConvNeXt `norm_pre`)."""
    found: list[nn.Module] = []

    def remember(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[-2:]) > 1:
            found.append(module)

    handles = [module.register_forward_hook(remember) for name, module in net.named_modules() if name]
    parameter = next(net.parameters())
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, CHANNELS, input_size, input_size, device=parameter.device, dtype=parameter.dtype))
        net.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise KitError(f"`{type(net).__name__}` has no spatial feature map (no module returns N×C×H×W): "
                       f"the report can draw maps for CNNs and ViTs only")
    return found[-1]


def target_layer(model: PatchClassifier) -> tuple[nn.Module, Callable | None]:
    """The layer whose activations and gradients make the map, and the reshape grad-cam needs for it (None for
    CNNs): the seed CNNs' last conv block (its max-pool, before Flatten), a timm ViT's last block's norm1 over the
    patch tokens, a timm CNN's last feature map before the pooling."""
    net = model.net
    if isinstance(net, tuple(BASELINES.values())):
        flatten = next(i for i, layer in enumerate(net) if isinstance(layer, nn.Flatten))
        return net[flatten - 1], None
    if is_vision_transformer(net):
        return net.blocks[-1].norm1, token_grid(net)
    if getattr(net, "output_fmt", "NCHW") != "NCHW":
        raise KitError(f"`{type(net).__name__}` keeps its features channels-last "
                       f"({net.output_fmt}); the report draws maps for CNNs (NCHW) and ViTs only")
    return last_spatial_module(net, model.input_size or IMAGE_SIZE), None


# ----------------------------------------------------------------------------------------------------------------
# Maps and the centre share
# ----------------------------------------------------------------------------------------------------------------

def hirescam_class():
    """grad-cam's HiResCAM, or one line saying how to install the package (the report goes on without maps)."""
    try:
        from pytorch_grad_cam import HiResCAM
    except ImportError:
        raise KitError("the maps of where the model looks need the grad-cam package: pip install 'grad-cam>=1.5.7' "
                       "(requirements.txt pins it)") from None
    return HiResCAM


def evidence_maps(model: PatchClassifier, images: np.ndarray, device: torch.device | None = None,
                  batch_size: int = MAP_BATCH) -> np.ndarray:
    """HiResCAM of the tumour logit for uint8 patches (N, 96, 96, 3): float32 (N, 96, 96), upsampled from the
    layer's grid and scaled to [0, 1] by grad-cam (0 where there is no evidence for tumour, 1 at its strongest)."""
    device = device or next(model.parameters()).device
    model = model.to(device).eval()
    layer, reshape = target_layer(model)
    hirescam = hirescam_class()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = hirescam(model=LogitColumn(model), target_layers=[layer], reshape_transform=reshape)
    maps = []
    try:
        for start in range(0, len(images), batch_size):
            batch = to_model_input(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])), device,
                                   channels_last=False)
            # the input takes part in the graph, so a layer gets gradients even when every weight before it is
            # frozen (model.trainable_blocks, frozen features)
            with torch.enable_grad():
                maps.append(cam(input_tensor=batch.requires_grad_(True),
                                targets=[ClassifierOutputTarget(0)] * len(batch)))
    finally:
        cam.activations_and_grads.release()        # the hooks would otherwise stay on the model
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps) if maps else np.empty((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


def centre_share(maps: np.ndarray) -> float:
    """The share of the maps' mass inside the centre 32×32, pooled over the maps (NaN when they hold none):
    `UNIFORM_CENTRE_SHARE` for flat maps, near 1 for a model that looks at the centre only."""
    maps = np.asarray(maps, dtype=np.float64)
    total = maps.sum()
    return float(maps[:, CENTRE, CENTRE].sum() / total) if total > 0 else float("nan")


def centre_shares(maps: np.ndarray) -> np.ndarray:
    """Each map's own centre share (NaN for an empty map)."""
    maps = np.asarray(maps, dtype=np.float64)
    totals = maps.sum(axis=(1, 2))
    centre = maps[:, CENTRE, CENTRE].sum(axis=(1, 2))
    return np.divide(centre, totals, out=np.full(len(maps), np.nan), where=totals > 0)


def share_sample(oof: pd.DataFrame, per_fold: int, threshold: float, seed: int = SAMPLE_SEED) -> pd.DataFrame:
    """The validation patches the share is measured on: per fold, up to `per_fold` of those its model calls tumour
    (score ≥ `threshold`), drawn at random with a fixed seed. Called positives, because the question is where a
    model finds the tumour it reports; a patch with no evidence for tumour has no place to look at."""
    called = oof[oof["pred"] >= threshold]
    return pd.concat([rows.sample(min(per_fold, len(rows)), random_state=seed) for _, rows in called.groupby("fold")]
                     + [oof.iloc[:0]], ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------
# The centre evidence of a run's folds
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class CentreEvidence:
    """The share of the models' evidence for tumour inside the centre 32×32, over a sample of each fold's
    validation patches called tumour, and the maps of the gallery's patches."""
    share: float                          # pooled over every fold's sample (NaN: no evidence anywhere)
    per_fold: dict[int, tuple[int, float]]   # fold → (patches in its sample, its share)
    layer: str                            # where the maps are read, in the first fold's model
    gallery_maps: dict[str, list[np.ndarray]]   # gallery row title → one map per patch

    @property
    def images(self) -> int:
        return sum(count for count, _ in self.per_fold.values())

    @property
    def shown(self) -> str:
        return share_text(self.share)

    def line(self) -> str:
        """The summary's line."""
        return (f"centre evidence share {self.shown} (over {self.images:,} validation patches called tumour; "
                f"a flat map gives {UNIFORM_CENTRE_SHARE:.3f})")


def share_text(share: float) -> str:
    """A share to three decimals, or "none" when the maps hold no evidence (or there are no maps)."""
    return "none" if np.isnan(share) else f"{share:.3f}"


def fold_model(cfg: Config, fold: int) -> PatchClassifier:
    """Fold `fold`'s best.pt as a model, or one line saying why it is none."""
    path = fold_dir(cfg, fold) / BEST
    try:
        model, _ = model_from_best(path)
    except KitError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise KitError(f"{path} does not rebuild a model ({type(err).__name__}: {err}); retrain fold {fold} "
                       f"(`make train FOLD={fold} FORCE=1`)") from None
    return model


def read_patches(image_dir: Path, ids) -> np.ndarray:
    """The training patches of `ids`, uint8 (N, 96, 96, 3)."""
    return np.stack([read_image(path) for path in image_paths(image_dir, ids)])


def centre_evidence(cfg: Config, oof: pd.DataFrame, images_per_fold: int = SALIENCY_IMAGES,
                    gallery: dict[str, pd.DataFrame] | None = None) -> CentreEvidence:
    """Class-activation maps of up to `images_per_fold` validation patches per fold that its best.pt calls tumour
    (at the default threshold), each fold's model on its own held-out patches (`oof`: id, label, pred, fold); plus
    the maps of the `gallery`'s patches (title → OOF rows). Raises KitError saying why when there can be none (no
    images, no grad-cam, …)."""
    if images_per_fold <= 0:
        raise KitError("--saliency-images 0 leaves the maps out")
    hirescam_class()                                  # grad-cam missing: say so before loading any model
    image_dir = Path(cfg.data_dir) / TRAIN_DIR
    if not image_dir.is_dir():
        raise KitError(f"the training images are not available ({image_dir} not found)")
    sample = share_sample(oof, images_per_fold, DEFAULT_THRESHOLD)
    gallery = gallery or {}
    device = select_device(cfg.device)
    folds = sorted(set(sample["fold"]).union(*(set(frame["fold"]) for frame in gallery.values())))
    per_fold, sample_maps, layer = {}, [], ""
    gallery_maps = {title: [None] * len(frame) for title, frame in gallery.items()}
    for fold in folds:
        model = fold_model(cfg, int(fold))
        if not layer:
            found, _ = target_layer(model)
            layer = next(name for name, module in model.named_modules() if module is found)

        rows = sample[sample["fold"] == fold]
        if len(rows):
            maps = evidence_maps(model, read_patches(image_dir, rows["id"]), device)
            per_fold[int(fold)] = (len(rows), centre_share(maps))
            sample_maps.append(maps)
        for title, frame in gallery.items():
            own = np.flatnonzero(frame["fold"].to_numpy() == fold)
            if len(own):
                maps = evidence_maps(model, read_patches(image_dir, frame["id"].iloc[own]), device)
                for position, evidence in zip(own, maps):
                    gallery_maps[title][position] = evidence
    share = centre_share(np.concatenate(sample_maps)) if sample_maps else float("nan")
    return CentreEvidence(share, per_fold, layer, gallery_maps)
