"""Shared fixtures: a small generated data set in the Kaggle layout and quick configs pointing at it."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# The kaggle client reads this at import: every test call goes to loopback, never to kaggle.com.
os.environ["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"
# Under pytest-xdist (`make test` runs `-n 2`) each worker gets its share of the cores, so the workers' torch threads
# do not oversubscribe them (the processes a test starts set their own thread counts).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", _threads)

import kit.bundle  # noqa: E402
from kit.bundle import OFFLINE_PACKAGES  # noqa: E402
from kit.config import load_config  # noqa: E402
from kit.demo_data import make_demo_data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """320 train / 48 test generated patches (the demo set is easy: 160 training patches learn it); read-only for
    tests (copy it to modify)."""
    return make_demo_data(tmp_path_factory.mktemp("data") / "demo", n_train=320, n_test=48, seed=1)


@pytest.fixture(scope="session")
def hard_data(tmp_path_factory) -> Path:
    """2,400 train / 100 test patches of the hard generated set (slides, stain, hard negatives, noisy labels)."""
    return make_demo_data(tmp_path_factory.mktemp("data") / "hard", n_train=2400, n_test=100, seed=0,
                          difficulty="hard")


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory) -> Path:
    """Real ImageNet weights of EfficientNet-Lite0 (17 MB, from a wheel: no download), as a timm weights file."""
    from kit.weights import write_lite0_imagenet_weights

    return write_lite0_imagenet_weights(tmp_path_factory.mktemp("weights") / "lite0-imagenet.pth")


@pytest.fixture
def data_copy(demo_data, tmp_path) -> Path:
    """A private copy of the demo data that a test may damage."""
    return Path(shutil.copytree(demo_data, tmp_path / "data"))


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory) -> Path:
    """One image cache for every quick config of a test process: the demo set is decoded once, not once a test (the
    cache is keyed by the source files' fingerprint and locked, so tests sharing it cannot see each other's)."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture
def quick_config(demo_data, tmp_path, shared_cache_dir):
    """configs/demo.yaml on the test data, writing under tmp_path; 2 folds × 2 epochs, each fold trained on 96 of
    its 160 training patches (the easy set learns on them) and validated on all its 160; 2 TTA views (the 8 of d4
    over the held-out patches made the out-of-fold prediction the slowest part of most tests)."""
    def make(**overrides):
        values = {"data_dir": str(demo_data), "out_dir": str(tmp_path / "runs"), "cache_dir": str(shared_cache_dir),
                  "submissions_dir": str(tmp_path / "submissions"), "epochs": 2, "batch_size": 32,
                  "folds.n_splits": 2, "eval_batch_size": 128, "tta.views": "hflip",
                  "max_train_images": 96}
        values.update(overrides)
        return load_config(REPO / "configs" / "demo.yaml", values)
    return make


def as_from_a_terminal() -> None:
    """Popen's preexec_fn for a process the test will Ctrl-C: its own process group, as a terminal's job has, and
    SIGINT at its default (a job started in the background by a non-interactive shell, as CI may be, inherits SIGINT
    ignored, and Python would then never raise KeyboardInterrupt)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def lock_held_elsewhere(path: Path):
    """Another process holding the kit lock at `path` (a fold's, or a split's cache build), as a training or build
    would; killed with -9 on exit, so no clean-up code of its own runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from kit.io import process_lock\n"
         f"with process_lock({str(path)!r}, ''):\n print('locked', flush=True); time.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


@pytest.fixture
def no_kaggle_credentials(monkeypatch, tmp_path):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg-config"))


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path, no_kaggle_credentials):
    """A fake Kaggle API on a free loopback port, the real kaggle client pointed at it, test credentials set."""
    from kagglesdk import kaggle_env

    from fake_kaggle import FakeKaggle

    with FakeKaggle() as fake:
        monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.LOCAL, fake.url)
        monkeypatch.setenv("KAGGLE_USERNAME", "kit-tester")
        monkeypatch.setenv("KAGGLE_KEY", "test-key-0123456789")
        yield fake


def python_without(packages: tuple[str, ...], folder: Path) -> Path:
    """A virtual environment that sees this one's packages (torch, timm, OpenCV, …) but not `packages`: its
    site-packages lists a folder linking every entry of ours except theirs. It has its own pip, to install into."""
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True)
    ours = Path(pd.__file__).resolve().parent.parent
    shadow = folder / "shared-site-packages"
    shadow.mkdir()
    for entry in ours.iterdir():
        if not entry.name.lower().startswith(packages):
            (shadow / entry.name).symlink_to(entry)
    (site,) = (folder / "venv" / "lib").glob("python*/site-packages")
    (site / "kit-test-shared.pth").write_text(f"{shadow}\n")
    return folder / "venv" / "bin" / "python"


def offline_pip_environment() -> dict:
    """pip with no configuration and an index that does not answer: only --no-index --find-links can install."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    return dict(env, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
                PIP_TIMEOUT="2", PIP_DISABLE_PIP_VERSION_CHECK="1")


THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def installed_wheels(packages, folder: Path) -> Path:
    """Each of `packages` as installed here, packed back into the wheel it was installed from (its files as its
    RECORD lists them, its WHEEL tags): a local wheel source for this Python, made without the network."""
    folder.mkdir(parents=True, exist_ok=True)
    for package in packages:
        dist = importlib.metadata.distribution(package)
        site = Path(dist.locate_file(""))
        info = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
        tags = [line.split(":", 1)[1].strip().split("-") for line in dist.read_text("WHEEL").splitlines()
                if line.startswith("Tag:")]
        tag = "-".join(".".join(sorted({t[i] for t in tags})) for i in range(3))
        records = []
        with zipfile.ZipFile(folder / f"{info[:-len('.dist-info')]}-{tag}.whl", "w") as wheel:
            for file in dist.files:
                if file.parts[0] == ".." or "__pycache__" in file.parts or (file.parts[0] == info and file.name in (
                        "RECORD", "INSTALLER", "REQUESTED", "direct_url.json")):
                    continue
                data = (site / file).read_bytes()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                records.append(f"{file.as_posix()},sha256={digest},{len(data)}\n")
                wheel.writestr(file.as_posix(), data)
            wheel.writestr(f"{info}/RECORD", "".join(records) + f"{info}/RECORD,,\n")
    return folder


@pytest.fixture(scope="session")
def local_wheels(tmp_path_factory) -> Path:
    """The bundle's offline packages as wheels in a local folder, packed from this environment."""
    return installed_wheels(OFFLINE_PACKAGES, tmp_path_factory.mktemp("wheels"))


@pytest.fixture
def offline_bundle(local_wheels, monkeypatch) -> Path:
    """`write_bundle` without the network: its wheels from `local_wheels` (KIT_WHEELS), for this Python only (what
    the installed packages were built for), and pip's index unreachable should anything ask it."""
    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    for name, value in offline_pip_environment().items():
        if name.startswith("PIP_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv(kit.bundle.WHEELS_VARIABLE, str(local_wheels))
    monkeypatch.setattr(kit.bundle, "TARGET_PYTHONS", (THIS_PYTHON,))
    return local_wheels


def assert_the_best_epoch_is_kept(cfg, fold: int, metrics: dict) -> None:
    """The fold's reported best val AUC is the best of its history.csv, and best.pt holds that epoch: exact values a
    fold of a few images can still be held to (its AUC itself says little there)."""
    from kit.checkpoints import load_checkpoint
    from kit.runs import fold_dir

    history = pd.read_csv(fold_dir(cfg, fold) / "history.csv")
    best = load_checkpoint(fold_dir(cfg, fold) / "best.pt")
    assert metrics["best_val_auc"] == best["val_auc"] == pytest.approx(history["val_auc"].max(), abs=1e-12)   # CSV
    assert metrics["best_epoch"] == best["epoch"] == int(history.loc[history["val_auc"].idxmax(), "epoch"])
