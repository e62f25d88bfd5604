"""A zip of the kit that runs offline on any machine with its own torch: a Kaggle notebook (attached read-only as a
dataset) or a bare GPU box.

Kaggle's image has torch, torchvision, timm, albumentations, OpenCV, numpy, pandas, scikit-learn, PyYAML, tqdm,
matplotlib and the kaggle client; it lacks ttach. A typical CUDA image (Python 3.12, its own torch, timm, OpenCV,
pandas, scikit-learn) lacks albumentations and its dependencies too. Neither has internet, so the bundle carries under
wheels/ a wheel of each (`OFFLINE_PACKAGES`, at the versions the kit is tested with; never torch), for CPython 3.11
and 3.12 on manylinux x86-64, and wheels/requirements-offline.txt naming them. The notebook installs what its image
lacks with `pip install --no-index --find-links`; on another machine:

    python3 -m pip install --no-index --no-deps --find-links wheels --target /tmp/site -r wheels/requirements-offline.txt
    PYTHONPATH=/tmp/site:$PWD python3 -m kit gpu-check

The wheels come from pip's configured index, or, where `KIT_WHEELS=<folder>` is set, from that folder alone
(`pip download --no-index --find-links`): a machine without internet that has the wheels makes the bundle too.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
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
# Runtime dependencies an image with its own torch may lack: ttach (Kaggle's lacks it), albumentations and what it
# needs beyond numpy/scipy/OpenCV/PyYAML (which such images have). Never torch, torchvision or timm.
OFFLINE_PACKAGES = ("ttach", "albumentations", "albucore", "pydantic", "pydantic-core", "annotated-types",
                    "typing-inspection", "typing-extensions", "stringzilla", "simsimd")
TARGET_PYTHONS = ("3.11", "3.12")
TARGET_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
WHEELS_DIR = "wheels"
OFFLINE_REQUIREMENTS = "requirements-offline.txt"      # under wheels/
WHEELS_VARIABLE = "KIT_WHEELS"      # a local folder of wheels to take them from instead of the package index


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
            if "__pycache__" in relative.parts or candidate.suffix == ".pyc":    # (checkpoints: a dot-folder)
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


def tested_version(package: str, requirements: Path) -> str:
    """`package==version`: requirements.txt's pin, else the version installed here (what the tests ran with)."""
    pattern = re.compile(rf"^{re.escape(package)}==(\S+)", re.IGNORECASE | re.MULTILINE)
    found = pattern.search(requirements.read_text())
    if found:
        return f"{package}=={found.group(1)}"
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        raise KitError(f"{package} is neither pinned in {requirements} nor installed here: the bundle needs its "
                       f"tested version (run `make kaggle-bundle` from the kit's .venv)") from None


def wheel_fits(wheel: Path, python: str) -> bool:
    """A wheel for any Python 3 (py3-none-any), or built for CPython `python` (cp312, or the abi3 of an older one)."""
    tags = wheel.name[:-len(".whl")].split("-")[-3:]
    wanted = "cp" + python.replace(".", "")
    return tags[0].startswith("py3") or wanted in tags[0].split(".") or tags[1] == "abi3"


def download_wheels(packages, folder: Path, requirements: Path, source: Path | None = None,
                    pythons: tuple[str, ...] = TARGET_PYTHONS) -> list[Path]:
    """Wheels of `packages` at their tested versions for each of `pythons` on manylinux x86-64 (no source builds),
    from pip's configured index, or from the folder `source` alone; refused in one line when one is missing."""
    specs = [tested_version(package, requirements) for package in packages]
    where = ["--no-index", "--find-links", str(source)] if source else []
    for python in pythons:
        platforms = [option for platform in TARGET_PLATFORMS for option in ("--platform", platform)]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               *where, *platforms, "--python-version", python, "--implementation", "cp", "--dest",
                               str(folder), *specs], capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            remedy = (f"add them to {source} ({WHEELS_VARIABLE}), or unset {WHEELS_VARIABLE} where pip can reach its "
                      f"package index" if source else "run `make kaggle-bundle` where pip can reach its package index")
            raise KitError(f"could not fetch the wheels the offline bundle needs for Python {python} "
                           f"({', '.join(specs)}){f' from {source}' if source else ''}: {reason}; {remedy}")
    wheels = sorted(folder.glob("*.whl"))
    for spec in specs:
        name = spec.split("==")[0].replace("-", "_").lower()
        for python in pythons:
            if not any(w.name.lower().startswith(name + "-") and wheel_fits(w, python) for w in wheels):
                raise KitError(f"no wheel of {spec} for Python {python} on manylinux x86-64 among those pip "
                               f"fetched: the offline bundle cannot install it there")
    (folder / OFFLINE_REQUIREMENTS).write_text("".join(f"{spec}\n" for spec in specs))
    return wheels + [folder / OFFLINE_REQUIREMENTS]


@functools.lru_cache(maxsize=4)
def offline_wheels(requirements_text: str, requirements: Path, source: Path | None,
                   pythons: tuple[str, ...]) -> tuple[tuple[str, bytes], ...]:
    """(file name, bytes) of every wheel the bundle carries, fetched once per process for a given requirements.txt,
    source and Pythons (a kaggle-run writes one bundle; the tests write several)."""
    with tempfile.TemporaryDirectory(prefix="kit-wheels-") as tmp:
        return tuple((path.name, path.read_bytes())
                     for path in download_wheels(OFFLINE_PACKAGES, Path(tmp), requirements, source, pythons))


def write_bundle(out: str | Path, repo: Path = REPO) -> Path:
    """Write the zip atomically; its top level holds kit/, configs/, notebooks/, wheels/ and the project files. The
    wheels come from the folder $KIT_WHEELS when it is set, else from pip's index."""
    out = Path(out)
    requirements = repo / "requirements.txt"
    source = os.environ.get(WHEELS_VARIABLE)
    wheels = offline_wheels(requirements.read_text(), requirements, Path(source).resolve() if source else None,
                            TARGET_PYTHONS)
    with atomic_path(out) as target, zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in bundle_files(repo):
            archive.write(path, path.relative_to(repo).as_posix())
        for name, data in wheels:
            archive.writestr(f"{WHEELS_DIR}/{name}", data)
    return out
