"""Shared fixtures: a small generated data set in the Kaggle layout and quick configs pointing at it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from kit.config import load_config  # noqa: E402
from kit.demo_data import make_demo_data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """600 train / 48 test generated patches; read-only for tests (copy it to modify)."""
    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", n_train=600, n_test=48, seed=1)


@pytest.fixture
def data_copy(demo_data, tmp_path) -> Path:
    """A private copy of the demo data that a test may damage."""
    return Path(shutil.copytree(demo_data, tmp_path / "data"))


@pytest.fixture
def quick_config(demo_data, tmp_path):
    """configs/demo.yaml on the test data, writing under tmp_path; 2 folds × 2 epochs."""
    def make(**overrides):
        values = {"data_dir": str(demo_data), "out_dir": str(tmp_path / "runs"),
                  "submissions_dir": str(tmp_path / "submissions"), "epochs": 2, "batch_size": 32,
                  "folds.n_splits": 2, "eval_batch_size": 128}
        values.update(overrides)
        return load_config(REPO / "configs" / "demo.yaml", values)
    return make
