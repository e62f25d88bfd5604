"""The compute device, decided in one place: which one, whether this torch build has kernels for the card, which
precision it really supports, how much memory it can spare, and how small tensors reach it without a hidden sync.

Kaggle lends T4 (compute capability 7.5: fp16 tensor cores, no bf16), T4 ×2, L4 (8.9: bf16) and P100 (6.0), for which
current torch builds ship no kernels: CUDA looks available, then the first real op fails. `select_device` refuses
such a card at start with one line.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from .errors import KitError

BF16_CAPABILITY = (8, 0)      # Ampere and later: bf16 tensor cores and cuDNN bf16 convolutions
PICK_INSTEAD = "pick a T4 or an L4 (on Kaggle: Settings → Accelerator), or run with device=cpu"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(requested: str) -> torch.device:
    """`auto`: the GPU when there is one (and torch has kernels for it), else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise KitError("config `device: cuda` but no GPU is visible to PyTorch; use device=auto or device=cpu")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda")
    check_kernels(device)
    torch.backends.cudnn.benchmark = True     # fixed 96 px batches: cuDNN picks its fastest kernels once (training
    return device                             # and inference alike)


def card_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"


def has_kernels(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch build compiled for `arch_list` (`torch.cuda.get_arch_list()`: "sm_75", "sm_90a",
    "compute_90", …) runs on a card of `capability`: machine code for the same major version and a minor one no
    newer than the card's, or PTX for an architecture no newer than the card, which the driver compiles."""
    for arch in arch_list:
        kind, _, code = arch.partition("_")
        digits = "".join(c for c in code if c.isdigit())        # "90a" → "90", "120" → "120"
        if len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= tuple(capability):
            return True
    return False


def check_kernels(device: torch.device) -> None:
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not has_kernels(torch.cuda.get_device_capability(device), arch_list):
        raise KitError(f"the GPU {card_name(device)} has no kernels in this PyTorch build ({torch.__version__}, "
                       f"built for {' '.join(arch_list)}): {PICK_INSTEAD}")


def autocast_dtype(device: torch.device, amp: bool, amp_dtype: str = "auto") -> torch.dtype | None:
    """The autocast precision: bf16 only where the card has bf16 tensor cores (capability ≥ 8.0; torch's own
    `is_bf16_supported()` also counts slow emulation), fp16 with loss scaling below; None = full precision (no
    `amp`, or the CPU). `amp_dtype` bf16 or fp16 forces one (bf16 is refused where the card lacks it)."""
    if not amp or device.type != "cuda":
        return None
    has_bf16 = torch.cuda.get_device_capability(device) >= BF16_CAPABILITY
    if amp_dtype == "bf16" and not has_bf16:
        raise KitError(f"amp_dtype=bf16, but the {card_name(device)} has no bf16 tensor cores (they start at "
                       f"8.0); use amp_dtype=auto, which trains in fp16 with loss scaling there")
    if amp_dtype in AMP_DTYPES:
        return AMP_DTYPES[amp_dtype]
    return torch.bfloat16 if has_bf16 else torch.float16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}.get(amp_dtype, "fp32")


def spare_memory(device: torch.device) -> int:
    """Bytes a new tensor can take on the GPU: what the card has free, plus what PyTorch's caching allocator holds
    but no tensor uses (it hands that out first; `mem_get_info` alone counts it as taken)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (indices, augmentation parameters) on `device` without stalling the GPU: copied from
    pinned memory, non-blocking (a copy from pageable memory waits for the stream to drain). No-op on the CPU."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The most GPU memory tensors held since the last reset, in MB; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


SYNC_DEBUG_VARIABLE = "KIT_SYNC_DEBUG"    # "error" or "warn": `make gpu-check` sets it to prove the loop never waits


@contextmanager
def sync_debug(device: torch.device):
    """Inside the training loop, apply the sync debug mode named by $KIT_SYNC_DEBUG (torch.cuda.set_sync_debug_mode:
    a GPU→CPU wait then raises or warns); the loop's intended reads go through `intended_sync`."""
    mode = os.environ.get(SYNC_DEBUG_VARIABLE, "")
    if device.type != "cuda" or not mode:
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextmanager
def sync_debug_error():
    """Every training loop inside runs under sync debug "error" (what `make gpu-check` proves the loop with)."""
    previous = os.environ.get(SYNC_DEBUG_VARIABLE)
    os.environ[SYNC_DEBUG_VARIABLE] = "error"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SYNC_DEBUG_VARIABLE, None)
        else:
            os.environ[SYNC_DEBUG_VARIABLE] = previous


@contextmanager
def intended_sync():
    """A read the loop means to make (the loss every `check_every` steps), allowed under `sync_debug`."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode("default")
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)
