"""A zip of the kit to upload as a Kaggle dataset, so a notebook can attach it read-only and import it, offline.

Kaggle's image has torch, torchvision, timm, albumentations, OpenCV, numpy, pandas, scikit-learn, PyYAML, tqdm,
matplotlib and the kaggle client; it lacks ttach. Notebooks pushed through the API run with the internet off, so the
bundle carries a wheel of every runtime dependency the image lacks (`KAGGLE_MISSING`, pinned as requirements.txt
pins them) under wheels/, and the notebook installs them with `pip install --no-index --find-links`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .competition import KAGGLE_CREDENTIAL_FILES
from .errors import KitError
from .io import atomic_path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("kit", "configs", "notebooks", "requirements.txt", "requirements-kaggle.txt", "README.md", "Makefile")
KAGGLE_MISSING = ("ttach",)          # runtime dependencies that Kaggle's image does not install
WHEELS_DIR = "wheels"


def bundle_files(repo: Path = REPO) -> list[Path]:
    """What the bundle ships: the files git tracks under BUNDLED (in a git checkout), never a dotfile or anything
    in a dot-folder, so a stray configs/kaggle.json or notebooks/.env (untracked) never reaches Kaggle. Outside a
    git checkout (a kit unpacked from a bundle) the same folders without dotfiles, caches or notebook checkpoints."""
    tracked = git_tracked_files(repo)
    files = []
    for name in BUNDLED:
        path = repo / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        for candidate in candidates:
            relative = candidate.relative_to(repo)
            if not candidate.is_file() or candidate.is_symlink():
                continue
            if any(part.startswith(".") for part in relative.parts) or candidate.name in KAGGLE_CREDENTIAL_FILES:
                continue
            if tracked is not None and relative.as_posix() not in tracked:
                continue
            if "__pycache__" in relative.parts or candidate.suffix == ".pyc" or \
                    "ipynb_checkpoints" in candidate.as_posix():
                continue
            files.append(candidate)
    return files


def git_tracked_files(repo: Path) -> set[str] | None:
    """Paths git tracks in `repo` (relative, POSIX), or None when `repo` is not a git checkout (or git is absent)."""
    if not (repo / ".git").exists():
        return None
    try:
        listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {name for name in listed.stdout.decode().split("\0") if name}


def pinned(package: str, requirements: Path) -> str:
    """`package==version` as requirements.txt pins it."""
    pattern = re.compile(rf"^{re.escape(package)}==\S+", re.IGNORECASE | re.MULTILINE)
    found = pattern.search(requirements.read_text())
    if not found:
        raise KitError(f"{requirements} does not pin {package} (package==version): the bundle's wheel needs a pin")
    return found.group(0)


def download_wheels(packages, folder: Path, requirements: Path) -> list[Path]:
    """Wheels of `packages` at their pinned versions, pure Python (any platform), from pip's configured index."""
    specs = [pinned(package, requirements) for package in packages]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--dest", str(folder), *specs], capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) < len(specs):
        reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise KitError(f"could not fetch the wheels the Kaggle bundle needs ({', '.join(specs)}): {reason}; run "
                       f"`make kaggle-bundle` where pip can reach its package index")
    return wheels


def write_bundle(out: str | Path, repo: Path = REPO) -> Path:
    """Write the zip atomically; its top level holds kit/, configs/, notebooks/, wheels/ and the project files."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="kit-wheels-") as tmp:
        wheels = download_wheels(KAGGLE_MISSING, Path(tmp), repo / "requirements.txt")
        with atomic_path(out) as target, zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in bundle_files(repo):
                archive.write(path, path.relative_to(repo).as_posix())
            for wheel in wheels:
                archive.write(wheel, f"{WHEELS_DIR}/{wheel.name}")
    return out
