"""The kit inside a Kaggle notebook: attached read-only from the bundle, run from another working directory."""

import json
import os
import re
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

import kit.bundle
from kit.bundle import OFFLINE_PACKAGES, write_bundle
from kit.errors import KitError

from conftest import THIS_PYTHON, offline_pip_environment, python_without

RUN_NOTEBOOK = r"""
import json, sys
notebook, injected = sys.argv[1], sys.argv[2]
namespace = {}
for cell in json.load(open(notebook))["cells"]:
    if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), notebook, "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            exec(injected, namespace)          # like papermill: test parameters after the parameters cell
"""


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


# What a CUDA image with its own torch lacks (the GPU boxes the kit is checked on): albumentations and its own
# dependencies, ttach, the kaggle client. (Kaggle's image lacks only ttach: a superset of its case.)
BARE_IMAGE_LACKS = ("albumentations", "albucore", "pydantic", "annotated_types", "typing_inspection", "stringzilla",
                    "simsimd", "ttach", "kaggle")


@pytest.mark.slow
def test_notebook_runs_offline_from_a_read_only_bundle_keeping_only_results_as_output(demo_data, tmp_path,
                                                                                      offline_bundle):
    kaggle = tmp_path / "kaggle"
    kit_input = kaggle / "input" / "hcd-kit"
    competition_input = kaggle / "input" / "histopathologic-cancer-detection"
    working = kaggle / "working"
    python = python_without(BARE_IMAGE_LACKS, tmp_path / "kaggle-image")
    for package in ("ttach", "albumentations", "kaggle"):
        lacking = subprocess.run([str(python), "-c", f"import {package}"], capture_output=True)
        assert lacking.returncode != 0, f"the test environment must lack {package}"
    with zipfile.ZipFile(write_bundle(tmp_path / "dist" / "hcd-kit.zip")) as bundle:   # what users upload
        bundle.extractall(kit_input)
    shutil.copytree(demo_data, competition_input)
    working.mkdir()
    for root in (kit_input, competition_input):
        make_read_only(root)
    before = {root: snapshot(root) for root in (kit_input, competition_input)}

    env = dict(offline_pip_environment(), KIT_KAGGLE_ROOT=str(kaggle),
               # root ignores file permissions; on Kaggle the input is truly read-only and Python skips bytecode
               PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH="")            # the kit must come from the attached input, not from this checkout
    # two folds at once, as on T4 x2: the worker processes must import the kit from the read-only input too
    parameters = ('CONFIG = "demo"\nOVERRIDES = {"epochs": 1, "folds.n_splits": 2, "max_train_images": 64, '
                  '"tta.views": "hflip"}\nFOLDS = "all"\nPARALLEL = 2\n'
                  'SUBMIT = False\n')
    result = subprocess.run([str(python), "-c", RUN_NOTEBOOK, str(kit_input / "notebooks" / "kaggle.ipynb"),
                             parameters], cwd=working, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"kit from {kit_input}" in result.stdout

    submission = pd.read_csv(working / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(competition_input / "sample_submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist() and submission["label"].between(0, 1).all()
    assert "device: CPU" in result.stdout and "train images/s: fold 0" in result.stdout
    for package in ("ttach", "albumentations", "pydantic_core"):
        assert list((tmp_path / "kaggle-image" / "venv" / "lib").glob(f"python*/site-packages/{package}/__init__.py")), \
            f"{package} comes from the bundle's wheel"

    # the output keeps what a user wants back; the cache and the resume state stay in scratch space
    assert list((working / "submissions").glob("demo-*.csv"))
    for fold in (0, 1):
        kept = {p.name for p in (working / "runs" / "demo" / f"fold{fold}").iterdir()}
        assert {"best.pt", "metrics.json", "oof.csv", "history.csv", "config.yaml", "run.json"} <= kept
        assert "last.pt" not in kept
    assert not list(working.rglob("*.npy")) and not list(working.rglob("last.pt"))
    scratch = kaggle / "temp"
    assert list(scratch.glob("cache/*/train-*.npy")) and list(scratch.glob("runs/demo/fold*/last.pt"))
    for root, files in before.items():
        assert snapshot(root) == files, f"something was written under {root}"


@pytest.mark.slow
def test_a_bare_torch_machine_runs_the_gpu_check_from_the_bundle_offline(tmp_path, offline_bundle):
    """The README's three lines on a machine with its own torch and no internet: the bundle's wheels installed into
    a folder on PYTHONPATH (never torch), then `python3 -m kit gpu-check`."""
    python = python_without(BARE_IMAGE_LACKS, tmp_path / "gpu-box")
    with zipfile.ZipFile(write_bundle(tmp_path / "dist" / "hcd-kit.zip")) as bundle:
        bundle.extractall(tmp_path / "hcd-kit")
    kit_home, site = tmp_path / "hcd-kit", tmp_path / "site"
    env = dict(offline_pip_environment(), PYTHONPATH="", TQDM_DISABLE="1")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--find-links",
                                "wheels", "--target", str(site), "-r", "wheels/requirements-offline.txt"],
                               cwd=kit_home, env=env, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert not list(site.glob("torch*")), "never torch"
    env["PYTHONPATH"] = f"{site}{os.pathsep}{kit_home}"

    no_gpu = subprocess.run([str(python), "-m", "kit", "gpu-check"], cwd=kit_home, env=env, capture_output=True,
                            text=True, timeout=300)
    assert no_gpu.returncode == 2 and no_gpu.stderr.strip().splitlines() == [no_gpu.stderr.strip()], no_gpu.stderr
    assert "needs a GPU" in no_gpu.stderr and "--device cpu" in no_gpu.stderr
    check = subprocess.run([str(python), "-m", "kit", "gpu-check", "--device", "cpu", "--quick", "--images", "300",
                            "--minutes", "0.2", "--out", str(tmp_path / "check")], cwd=kit_home, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, (check.stdout + check.stderr)[-3000:]
    assert re.search(r"baseline_bn +auto +eager +[\d,]+ ", check.stdout) and check.stdout.strip().endswith(".json")
    where = subprocess.run([str(python), "-c", "import albumentations, ttach; print(albumentations.__file__)"],
                           env=env, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), "albumentations from the bundle's wheels"


def test_bundle_holds_the_kit_configs_notebook_and_a_wheel_of_each_offline_package(tmp_path, offline_bundle):
    with zipfile.ZipFile(write_bundle(tmp_path / "kit.zip")) as bundle:
        names = set(bundle.namelist())
        pinned = bundle.read("wheels/requirements-offline.txt").decode().split()
    assert {"kit/__init__.py", "kit/api.py", "configs/baseline.yaml", "notebooks/kaggle.ipynb",
            "requirements.txt", "requirements-kaggle.txt", "wheels/ttach-0.0.3-py3-none-any.whl"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    json.loads(zipfile.ZipFile(tmp_path / "kit.zip").read("notebooks/kaggle.ipynb"))
    assert pinned[:2] == ["ttach==0.0.3", "albumentations==2.0.8"] and len(pinned) == len(OFFLINE_PACKAGES)
    wheels = {name.split("/")[1] for name in names if name.endswith(".whl")}
    for spec in pinned:                          # each at its tested version, from the local folder
        name, version = spec.split("==")
        assert any(w.lower().startswith(f"{name.replace('-', '_')}-{version}-") for w in wheels), spec
    assert wheels == {w.name for w in offline_bundle.glob("*.whl")}


def test_a_bundle_whose_wheel_folder_lacks_a_python_is_refused_naming_it(tmp_path, offline_bundle, monkeypatch):
    """Without internet, KIT_WHEELS must hold every target Python's wheels: this folder has this Python's only."""
    other = "3.12" if THIS_PYTHON != "3.12" else "3.11"
    monkeypatch.setattr(kit.bundle, "TARGET_PYTHONS", (THIS_PYTHON, other))
    with pytest.raises(KitError) as caught:
        write_bundle(tmp_path / "kit.zip")
    message = str(caught.value)
    assert message.startswith(f"could not fetch the wheels the offline bundle needs for Python {other} (ttach==0.0.3, "
                              f"albumentations==2.0.8, ")
    assert f"from {offline_bundle}: " in message and "No matching distribution found for" in message
    assert message.endswith(f"add them to {offline_bundle} (KIT_WHEELS), or unset KIT_WHEELS where pip can reach its "
                            f"package index")
    assert not (tmp_path / "kit.zip").exists()


def test_on_kaggle_runs_and_cache_default_to_scratch_unless_set(tmp_path, monkeypatch):
    from kit import api
    from kit.config import save_config

    competition = tmp_path / "kaggle" / "input" / "histopathologic-cancer-detection"
    competition.mkdir(parents=True)
    (competition / "sample_submission.csv").write_text("id,label\n")
    (tmp_path / "kaggle" / "working").mkdir()
    monkeypatch.setenv("KIT_KAGGLE_ROOT", str(tmp_path / "kaggle"))
    monkeypatch.chdir(tmp_path)

    cfg = api.load_config("demo")
    scratch = tmp_path / "kaggle" / "temp"
    assert (cfg.out_dir, cfg.cache_dir) == (str(scratch / "runs"), str(scratch / "cache"))
    assert cfg.data_dir == str(competition)
    assert api.load_config("demo", {"out_dir": "mine"}).out_dir == "mine"
    # a config file that sets them (what fold-parallel workers are given) keeps them
    save_config(api.load_config("demo", {"out_dir": "/elsewhere/runs", "cache_dir": "/local/cache"}),
                tmp_path / "worker.yaml")
    worker = api.load_config(str(tmp_path / "worker.yaml"))
    assert (worker.out_dir, worker.cache_dir) == ("/elsewhere/runs", "/local/cache")


def test_the_kaggle_notebook_step_says_what_it_changed_and_is_nothing_outside_a_notebook(tmp_path, monkeypatch):
    """api.load_config = config.load_config, then kaggle_environment: outside a notebook the two agree and nothing is
    said; inside, one line names the step and every key it moved."""
    from kit import api, config
    from kit.kaggle_notebook import kaggle_environment

    kaggle = tmp_path / "kaggle"
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setenv("KIT_KAGGLE_ROOT", str(kaggle))             # no /kaggle tree: not a notebook
    monkeypatch.chdir(tmp_path)
    lines = []
    plain = config.load_config("demo", {"epochs": 1})
    assert kaggle_environment(plain, log=lines.append) is plain and lines == []
    assert api.load_config("demo", {"epochs": 1}) == plain == api.load_config("demo", epochs=1)

    competition = kaggle / "input" / "histopathologic-cancer-detection"
    competition.mkdir(parents=True)
    (competition / "sample_submission.csv").write_text("id,label\n")
    (kaggle / "working").mkdir()
    on_kaggle = kaggle_environment(plain, log=lines.append)
    scratch = kaggle / "temp"
    assert (on_kaggle.data_dir, on_kaggle.out_dir, on_kaggle.cache_dir) == \
        (str(competition), str(scratch / "runs"), str(scratch / "cache"))
    assert lines == [f"Kaggle notebook environment: data_dir → {competition} (the attached competition); "
                     f"out_dir → {scratch / 'runs'}, cache_dir → {scratch / 'cache'} (scratch space: the notebook's "
                     f"output keeps only results)"]
    assert config.to_dict(on_kaggle) == config.to_dict(plain) | {"data_dir": str(competition),
                                                                  "out_dir": str(scratch / "runs"),
                                                                  "cache_dir": str(scratch / "cache")}
    lines.clear()
    assert kaggle_environment(on_kaggle, log=lines.append) is on_kaggle      # what fold-parallel workers load
    assert lines == ["Kaggle notebook environment: nothing changed (data_dir, out_dir and cache_dir as the config "
                     "sets them)"]


def test_in_a_notebook_cache_and_resume_state_stay_in_scratch_whatever_data_dir_says(tmp_path, monkeypatch):
    from kit import api
    from kit.data import check_data_dir

    kaggle = tmp_path / "kaggle"
    copy = kaggle / "input" / "my-copy-of-the-competition"       # attached under another name
    copy.mkdir(parents=True)
    (kaggle / "working").mkdir()
    monkeypatch.setenv("KIT_KAGGLE_ROOT", str(kaggle))
    monkeypatch.chdir(kaggle / "working")
    cfg = api.load_config("demo", {"data_dir": str(copy)})
    scratch = kaggle / "temp"
    assert cfg.data_dir == str(copy)
    assert (cfg.out_dir, cfg.cache_dir) == (str(scratch / "runs"), str(scratch / "cache"))

    # advice a notebook user can follow: attach an input, not `make data` on a read-only folder
    with pytest.raises(KitError) as caught:
        check_data_dir(copy)
    assert "Add Input" in str(caught.value) and "make data" not in str(caught.value)
    monkeypatch.setenv("KIT_KAGGLE_ROOT", str(tmp_path / "not-kaggle"))
    with pytest.raises(KitError, match="run `make data`"):
        check_data_dir(copy)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=kit", "-c", "user.email=kit@localhost", *args],
                   check=True, capture_output=True)


def test_the_bundle_ships_tracked_files_only_never_a_dotfile_or_credentials(tmp_path):
    from kit.bundle import BUNDLED, bundle_files

    repo = tmp_path / "repo"
    for name in BUNDLED:
        path = repo / name
        if "." in name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
        else:
            path.mkdir(parents=True)
            (path / "shipped.txt").write_text("yes")
    (repo / "configs" / ".tracked-dotfile.yaml").write_text("x")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "kit")
    (repo / "configs" / "kaggle.json").write_text('{"username": "me", "key": "secret"}')   # untracked strays
    (repo / "notebooks" / ".env").write_text("KAGGLE_KEY=secret")
    (repo / "configs" / "my_experiment.yaml").write_text("epochs: 1")

    def shipped() -> set[str]:
        return {path.relative_to(repo).as_posix() for path in bundle_files(repo)}

    names = shipped()
    assert {"kit/shipped.txt", "configs/shipped.txt", "notebooks/shipped.txt", "README.md"} <= names
    assert not names & {"configs/kaggle.json", "notebooks/.env", "configs/.tracked-dotfile.yaml",
                        "configs/my_experiment.yaml"}
    shutil.rmtree(repo / ".git")                   # a kit unpacked from a bundle: no git to ask
    names = shipped()
    assert "configs/my_experiment.yaml" in names
    assert not names & {"configs/kaggle.json", "notebooks/.env", "configs/.tracked-dotfile.yaml"}
