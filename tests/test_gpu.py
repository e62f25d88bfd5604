"""The `gpu` tests: what must hold on a GPU, run where CUDA is (`make gpu-check` runs the same checks as rows, from
kit/gpu_correctness.py). Without CUDA they are skipped with that reason; KIT_GPU_TESTS_ON_CPU=1 runs them on the
CPU instead, to try them out before a GPU is at hand."""

from __future__ import annotations

import os

import pytest
import torch

from kit.gpu_correctness import CHECKS, NEEDS_TWO_GPUS

ON_CPU = os.environ.get("KIT_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() and not ON_CPU,
    reason="no CUDA device here: the gpu tests run on a GPU machine (make gpu-check runs the same checks)")]


@pytest.mark.parametrize("name", list(CHECKS))
def test_on_the_gpu(name, demo_data, tmp_path):
    if name in NEEDS_TWO_GPUS and DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"{name} needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    found = CHECKS[name](demo_data, tmp_path / "runs", DEVICE)
    assert found, f"{name} returned no numbers"
