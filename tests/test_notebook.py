"""The kit inside a Kaggle notebook: attached read-only from the bundle, run from another working directory."""

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

from kit.bundle import write_bundle

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


def test_notebook_runs_from_a_read_only_bundle_and_writes_only_to_the_working_dir(demo_data, tmp_path):
    kaggle = tmp_path / "kaggle"
    kit_input = kaggle / "input" / "hcd-kit"
    competition_input = kaggle / "input" / "histopathologic-cancer-detection"
    working = kaggle / "working"
    with zipfile.ZipFile(write_bundle(tmp_path / "dist" / "hcd-kit.zip")) as bundle:   # what users upload
        bundle.extractall(kit_input)
    shutil.copytree(demo_data, competition_input)
    working.mkdir()
    for root in (kit_input, competition_input):
        make_read_only(root)
    before = {root: snapshot(root) for root in (kit_input, competition_input)}

    env = dict(os.environ, KIT_KAGGLE_ROOT=str(kaggle),
               # root ignores file permissions; on Kaggle the input is truly read-only and Python skips bytecode
               PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH="")            # the kit must come from the attached input, not from this checkout
    parameters = 'CONFIG = "demo"\nOVERRIDES = {"epochs": 1, "folds.n_splits": 2}\nFOLDS = "all"\nSUBMIT = False\n'
    result = subprocess.run([sys.executable, "-c", RUN_NOTEBOOK, str(kit_input / "notebooks" / "kaggle.ipynb"),
                             parameters], cwd=working, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"kit from {kit_input}" in result.stdout

    submission = pd.read_csv(working / "submission.csv", dtype={"id": str})
    sample = pd.read_csv(competition_input / "sample_submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist() and submission["label"].between(0, 1).all()
    assert (working / "runs" / "demo" / "fold1" / "best.pt").is_file()
    assert list((working / "submissions").glob("demo-*.csv"))
    for root, files in before.items():
        assert snapshot(root) == files, f"something was written under {root}"


def test_bundle_holds_the_kit_configs_and_notebook(tmp_path):
    with zipfile.ZipFile(write_bundle(tmp_path / "kit.zip")) as bundle:
        names = set(bundle.namelist())
    assert {"kit/__init__.py", "kit/api.py", "configs/baseline.yaml", "notebooks/kaggle.ipynb",
            "requirements.txt"} <= names
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    json.loads(zipfile.ZipFile(tmp_path / "kit.zip").read("notebooks/kaggle.ipynb"))
