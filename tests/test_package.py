"""The kit as a package and a tool: `pip install .` gives a working `hcd-kit` command outside the checkout, ruff's
rules catch real defects and pass on the kit, and `make` alone says what it can do."""

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, offline_pip_environment, python_without


@pytest.mark.slow
def test_pip_install_gives_an_hcd_kit_command_that_trains_a_fold_outside_the_checkout(demo_data, tmp_path):
    source = tmp_path / "source"
    for name in ("kit", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    python = python_without((), tmp_path / "fresh")           # sees torch, timm, …; not the kit
    # the venv's own setuptools (Python 3.11's ensurepip copy) cannot build wheels without `wheel`: offline, the
    # build takes this machine's setuptools instead, as pip's build isolation would take the newest from the index
    (own,) = (tmp_path / "fresh" / "venv" / "lib").glob("python*/site-packages")
    for bundled in [*own.glob("setuptools*"), *own.glob("pkg_resources"), *own.glob("_distutils_hack"),
                    *own.glob("distutils-precedence.pth")]:
        if bundled.is_dir():
            shutil.rmtree(bundled)
        else:
            bundled.unlink()
    env = dict(offline_pip_environment(), TQDM_DISABLE="1", PYTHONPATH="")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                "--no-build-isolation", str(source)], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    shutil.rmtree(source)                                     # the installed copy must stand on its own
    command = python.parent / "hcd-kit"
    shown = subprocess.run([str(command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "train-all" in shown.stdout and "gpu-check" in shown.stdout
    where = subprocess.run([str(python), "-c", "import kit.config; print(kit.config.CONFIGS_DIR)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert str(tmp_path / "fresh" / "venv") in where.stdout and where.stdout.strip().endswith("kit/configs")
    trained = subprocess.run([str(command), "train", "--config", "demo", "--fold", "0", "--data-dir",
                              str(demo_data), "--out", str(tmp_path / "runs"), "epochs=1", "folds.n_splits=2",
                              "max_train_images=64", "tta.views=none"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "runs" / "demo" / "fold0" / "metrics.json").is_file()


def test_the_lint_rules_catch_real_defects_and_pass_on_the_kit(tmp_path):
    ruff = [sys.executable, "-m", "ruff", "check", "--config", str(REPO / "pyproject.toml")]
    defects = tmp_path / "defects.py"
    defects.write_text("import os\n\n\ndef last(items=[]):\n    for item in items:\n        pass\n    return itme\n")
    found = subprocess.run([*ruff, "--output-format", "concise", str(defects)], capture_output=True, text=True)
    codes = set(re.findall(r": ([A-Z]+\d+) ", found.stdout))
    assert found.returncode == 1 and {"F401", "F821", "B006", "B007"} <= codes, found.stdout
    clean = subprocess.run([*ruff, "kit", "tests"], cwd=REPO, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout[-2000:]


def test_make_alone_lists_every_target_with_its_line_and_the_variables():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)$", makefile, re.M).group(1).replace("\\\n", " ").split()
    shown = subprocess.run(["make", "-s"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    listed = dict(re.findall(r"^  ([a-z][a-z-]*) +(\S.*)$", shown.stdout, re.M))
    assert set(phony) - {"help"} <= set(listed), f"not in `make help`: {sorted(set(phony) - set(listed))}"
    assert "Variables: CONFIG, FOLD" in shown.stdout


def test_the_training_path_of_the_baseline_cnn_loads_no_timm_or_torchvision():
    """Every `python -m kit train` and fold-parallel or DDP worker imports the engine: timm and the torchvision it
    pulls in (about 4 s on 2 cores) load only where a timm model, the EMA or the focal loss needs them."""
    check = ("import sys, kit.engine, kit.parallel, kit.features\n"
             "from kit.config import load_config\nfrom kit.models import build_model\n"
             "from kit.recipe import build_loss\n"
             "cfg = load_config('demo')\nbuild_model(cfg.model)\nbuild_loss(cfg.loss, 'cpu')\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'timm', 'torchvision'}))")
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
