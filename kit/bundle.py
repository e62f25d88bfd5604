"""A zip of the kit to upload as a Kaggle dataset, so a notebook can attach it read-only and import it."""

from __future__ import annotations

import zipfile
from pathlib import Path

from .io import atomic_path

REPO = Path(__file__).resolve().parent.parent
BUNDLED = ("kit", "configs", "notebooks", "requirements.txt", "README.md", "Makefile")


def bundle_files(repo: Path = REPO) -> list[Path]:
    files = []
    for name in BUNDLED:
        path = repo / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [f for f in candidates if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"
                  and ".ipynb_checkpoints" not in f.parts]
    return files


def write_bundle(out: str | Path, repo: Path = REPO) -> Path:
    """Write the zip atomically; its top level holds kit/, configs/, notebooks/ and the project files."""
    out = Path(out)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in bundle_files(repo):
            archive.write(path, path.relative_to(repo).as_posix())
    return out
