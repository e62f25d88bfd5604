"""The Kaggle data layout: reading and validating CSVs and TIFFs, the uint8 image cache, and training datasets.

Every TIFF of a split is decoded once (in parallel, all cores) into one uint8 array file of shape (N, 96, 96, 3),
RGB, memory-mapped by every fold and epoch afterwards. The file name carries a fingerprint of the source files
(ids, sizes, mtimes): a changed source gets a new cache, and a build that did not finish never has the final name.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .competition import (CHANNELS, IMAGE_SIZE, IMAGE_SUFFIX, SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_DIR,
                          TRAIN_LABELS_CSV)
from .errors import KitError
from .io import atomic_path

GET_DATA_HINT = "run `make data` (or `make demo-data` for generated data), or pass DATA_DIR=/path/to/data"


# ----------------------------------------------------------------------------------------------------------------
# The Kaggle layout
# ----------------------------------------------------------------------------------------------------------------

def check_data_dir(data_dir: str | Path) -> Path:
    """The data folder must hold train/, test/, train_labels.csv and sample_submission.csv."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise KitError(f"data folder not found: {data_dir}: {GET_DATA_HINT}")
    missing = [name for name in (TRAIN_LABELS_CSV, SAMPLE_SUBMISSION_CSV, TRAIN_DIR, TEST_DIR)
               if not (data_dir / name).exists()]
    if missing:
        raise KitError(f"{data_dir} lacks {', '.join(missing)}: {GET_DATA_HINT}")
    return data_dir


def read_id_label_csv(path: Path, labels_must_be_binary: bool) -> pd.DataFrame:
    """Read an `id,label` CSV, refusing a wrong header, empty or duplicate ids, and (for training) non-0/1 labels."""
    if not path.is_file():
        raise KitError(f"{path} not found: {GET_DATA_HINT}")
    try:
        frame = pd.read_csv(path, dtype={"id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise KitError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    if list(frame.columns) != ["id", "label"]:
        raise KitError(f"{path}: header must be `id,label`, found `{','.join(map(str, frame.columns))}`")
    if frame.empty:
        raise KitError(f"{path} has no rows")
    blank = frame["id"].isna() | (frame["id"].str.strip() == "")
    if blank.any():
        raise KitError(f"{path}: row {_row(blank)} has an empty id")
    duplicated = frame["id"].duplicated()
    if duplicated.any():
        raise KitError(f"{path}: row {_row(duplicated)} repeats id {frame['id'][duplicated].iloc[0]}")
    if labels_must_be_binary:
        numeric = pd.to_numeric(frame["label"], errors="coerce")
        bad = ~numeric.isin([0, 1])
        if bad.any():
            raise KitError(f"{path}: row {_row(bad)} has label {frame['label'][bad].iloc[0]}; labels must be 0 or 1")
        frame["label"] = numeric.astype(np.int64)
    return frame


def read_train_labels(data_dir: str | Path) -> pd.DataFrame:
    return read_id_label_csv(Path(data_dir) / TRAIN_LABELS_CSV, labels_must_be_binary=True)


def read_sample_submission(data_dir_or_file: str | Path) -> pd.DataFrame:
    path = Path(data_dir_or_file)
    if path.is_dir() or path.suffix != ".csv":
        path = path / SAMPLE_SUBMISSION_CSV
    return read_id_label_csv(path, labels_must_be_binary=False)


def _row(mask: pd.Series) -> int:
    """1-based line number in the file of the first True (line 1 is the header)."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

def read_image(path: str | Path) -> np.ndarray:
    """Decode one patch as RGB uint8 (96, 96, 3); an unreadable, truncated or wrongly shaped file is named."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        if not Path(path).exists():
            raise KitError(f"image missing: {path}: {GET_DATA_HINT}")
        raise KitError(f"cannot decode {path}: the file is unreadable or truncated; re-download it (`make data`)")
    if image.dtype != np.uint8 or image.shape != (IMAGE_SIZE, IMAGE_SIZE, CHANNELS):
        shape = "×".join(map(str, image.shape))
        raise KitError(f"{path} is {shape} {image.dtype}; every patch must be "
                       f"{IMAGE_SIZE}×{IMAGE_SIZE}×{CHANNELS} uint8 RGB")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)   # OpenCV decodes to BGR


def image_paths(image_dir: Path, ids) -> list[Path]:
    return [image_dir / f"{image_id}{IMAGE_SUFFIX}" for image_id in ids]


def source_fingerprint(paths: list[Path], csv_name: str) -> str:
    """Hash of every file's name, size and mtime, in order: any change to the source changes it."""
    digest = hashlib.sha1()
    missing = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            missing.append(path)
            continue
        digest.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KitError(f"{missing[0]} is missing{more}, though {csv_name} lists its id: {GET_DATA_HINT}")
    return digest.hexdigest()


def _decode_chunk(paths: list[str]) -> np.ndarray:
    return np.stack([read_image(path) for path in paths])


def _worker_init() -> None:
    cv2.setNumThreads(1)        # one process per core already; OpenCV threads would only contend


def decode_images(paths: list[Path], out: np.ndarray, workers: int, desc: str) -> None:
    """Decode `paths` into `out` (N, 96, 96, 3) in parallel, with a progress bar in images."""
    chunk = 256
    chunks = [[str(p) for p in paths[start:start + chunk]] for start in range(0, len(paths), chunk)]
    bar = tqdm(total=len(paths), desc=desc, unit="img", dynamic_ncols=True, mininterval=0.5)
    with bar:
        if workers <= 1 or len(chunks) == 1:
            results = map(_decode_chunk, chunks)
            pool = None
        else:
            # fork is fast and needs no re-import; fall back to the platform default elsewhere
            method = "fork" if sys.platform.startswith("linux") else None
            pool = multiprocessing.get_context(method).Pool(workers, initializer=_worker_init)
            results = pool.imap(_decode_chunk, chunks)
        try:
            start = 0
            for decoded in results:
                out[start:start + len(decoded)] = decoded
                start += len(decoded)
                bar.update(len(decoded))
        finally:
            if pool is not None:
                pool.terminate()


def cache_dir_for(out_dir: str | Path, data_dir: str | Path) -> Path:
    """One cache folder per data folder, so two data sets never evict each other's cache."""
    source = Path(data_dir).resolve()
    return Path(out_dir) / "cache" / f"{source.name}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}"


def load_split_images(data_dir: str | Path, split: str, ids, cache_dir: str | Path,
                      workers: int | None = None) -> np.ndarray:
    """Return the split's images (N, 96, 96, 3) uint8 RGB in `ids` order, memory-mapped from the cache.

    The cache is built on first need, and rebuilt when the source files change.
    """
    image_dir = Path(data_dir) / (TRAIN_DIR if split == "train" else TEST_DIR)
    csv_name = TRAIN_LABELS_CSV if split == "train" else SAMPLE_SUBMISSION_CSV
    paths = image_paths(image_dir, ids)
    fingerprint = source_fingerprint(paths, csv_name)
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / f"{split}-{len(paths)}-{fingerprint[:16]}.npy"
    if not cache_file.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob(f"{split}-*.npy"):
            stale.unlink()
        workers = workers or os.cpu_count() or 1
        with atomic_path(cache_file) as tmp:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                              shape=(len(paths), IMAGE_SIZE, IMAGE_SIZE, CHANNELS))
            decode_images(paths, array, workers, desc=f"cache {split}")
            array.flush()
            del array
    return np.load(cache_file, mmap_mode="r")


# ----------------------------------------------------------------------------------------------------------------
# Batches for the model
# ----------------------------------------------------------------------------------------------------------------

class PatchDataset(torch.utils.data.Dataset):
    """Patches `indices` of a uint8 image array, each through an albumentations transform, as uint8 HWC tensors."""

    def __init__(self, images: np.ndarray, indices: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.indices, self.labels, self.transform = images, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        image = np.array(self.images[self.indices[item]])   # a writable copy out of the read-only cache
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(self.labels[item], dtype=torch.float32)


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader workers get copies of one transform: reseed each from its own torch seed (epoch- and
    worker-specific, derived from the loader's generator) so workers draw different, reproducible augmentations."""
    dataset = torch.utils.data.get_worker_info().dataset
    if getattr(dataset, "transform", None) is not None:
        dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def to_model_input(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C, H, W) in [0, 1] on `device`; the copy travels as uint8 (4× less data)."""
    batch = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return batch.contiguous(memory_format=memory_format)
