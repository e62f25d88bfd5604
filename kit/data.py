"""The Kaggle data layout: reading and validating CSVs and TIFFs, the uint8 image cache, and the batches that feed
training (gathered from the cache, on the device when it fits there).

Every TIFF of a split is decoded once (in parallel, all cores) into one uint8 array of shape (N, 96, 96, 3), RGB, kept
by kit/array_cache.py (locked, resumable, atomic, memory-mapped by every fold and epoch afterwards). The file name
carries a fingerprint of the source files (ids, sizes, mtimes, ctimes, inodes): a changed source gets a new cache,
even when a copy kept size and mtime (`cp -p`, `rsync -a`, `touch -r`: the ctime still moves).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from . import array_cache
from .competition import (
    CHANNELS,
    IMAGE_SIZE,
    IMAGE_SUFFIX,
    SAMPLE_SUBMISSION_CSV,
    TEST_DIR,
    TRAIN_DIR,
    TRAIN_LABELS_CSV,
)
from .errors import KitError
from .kaggle_notebook import get_data_hint, repair_hint
from .progress import progress_bar

SHOWN_PROBLEMS = 5          # bad files named in a message; the rest are counted
ROW_BYTES = IMAGE_SIZE * IMAGE_SIZE * CHANNELS

cv2.setLogLevel(0)          # OpenCV's own "[ WARN] … TIFFReadRGBAStrip" lines: the kit names every bad file itself


# ----------------------------------------------------------------------------------------------------------------
# The Kaggle layout
# ----------------------------------------------------------------------------------------------------------------

def check_data_dir(data_dir: str | Path) -> Path:
    """The data folder must hold train/, test/, train_labels.csv and sample_submission.csv."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise KitError(f"data folder not found: {data_dir}: {get_data_hint()}")
    missing = [name for name in DATA_ENTRIES if not (data_dir / name).exists()]
    if missing:
        raise KitError(f"{data_dir} lacks {', '.join(missing)}: {what_is_there(data_dir) or get_data_hint()}")
    return data_dir


DATA_ENTRIES = (TRAIN_LABELS_CSV, SAMPLE_SUBMISSION_CSV, TRAIN_DIR, TEST_DIR)


def what_is_there(data_dir: Path) -> str | None:
    """The way out when the data sits one level down (the unzipped competition folder inside DATA_DIR), or only as
    the competition's zip (a browser download): None when neither is there."""
    inside = [child for child in sorted(data_dir.iterdir()) if child.is_dir() and
              all((child / name).exists() for name in DATA_ENTRIES)]
    if inside:
        return f"the data is one level down, in {inside[0]}: pass DATA_DIR={inside[0]}"
    zips = sorted(data_dir.glob("*.zip"))
    if zips:
        return (f"it holds {zips[0].name}: run `make data DATA_DIR={data_dir}` to unzip and verify it (nothing is "
                f"downloaded when the zip is there)")
    return None


def read_id_label_csv(path: Path, labels_must_be_binary: bool) -> pd.DataFrame:
    """Read an `id,label` CSV, refusing a wrong header, empty or duplicate ids, and (for training) non-0/1 labels."""
    if not path.is_file():
        raise KitError(f"{path} not found: {get_data_hint()}")
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
        raise KitError(f"{path}: row {first_line_of(blank)} has an empty id")
    check_ids_unpadded(frame["id"], path)
    check_ids_are_file_names(frame["id"], path)
    duplicated = frame["id"].duplicated()
    if duplicated.any():
        raise KitError(f"{path}: row {first_line_of(duplicated)} repeats id {frame['id'][duplicated].iloc[0]}")
    if labels_must_be_binary:
        numeric = pd.to_numeric(frame["label"], errors="coerce")
        bad = ~numeric.isin([0, 1])
        if bad.any():
            raise KitError(f"{path}: row {first_line_of(bad)} has label {frame['label'][bad].iloc[0]}; labels must be 0 or 1")
        frame["label"] = numeric.astype(np.int64)
    return frame


def read_train_labels(data_dir: str | Path) -> pd.DataFrame:
    return read_id_label_csv(Path(data_dir) / TRAIN_LABELS_CSV, labels_must_be_binary=True)


def read_sample_submission(data_dir_or_file: str | Path) -> pd.DataFrame:
    path = Path(data_dir_or_file)
    if path.is_dir() or path.suffix != ".csv":
        path = path / SAMPLE_SUBMISSION_CSV
    return read_id_label_csv(path, labels_must_be_binary=False)


def first_line_of(mask: pd.Series) -> int:
    """1-based line number in a CSV of the first True row of `mask` (line 1 is the header)."""
    return int(np.flatnonzero(mask.to_numpy())[0]) + 2


def check_ids_unpadded(ids: pd.Series, name: str | Path) -> None:
    """An id with leading or trailing whitespace names no file and matches no Kaggle id: say so, not "missing"."""
    padded = ids.astype(str) != ids.astype(str).str.strip()
    if padded.any():
        value = ids[padded].iloc[0]
        raise KitError(f"{name}: row {first_line_of(padded)} has id {value!r} with leading/trailing whitespace "
                       f"({int(padded.sum()):,} such rows); remove it, e.g. {value.strip()!r}")


def check_ids_are_file_names(ids: pd.Series, name: str | Path) -> None:
    """Every id names a file inside train/ or test/: no folder separators, not `.` or `..` (the competition's ids are
    40 hexadecimal digits), so no CSV row reads an image from outside the data folder."""
    text = ids.astype(str)
    escaping = text.str.contains(r"[/\\\x00]", regex=True) | text.isin([".", ".."])
    if escaping.any():
        value = text[escaping].iloc[0]
        raise KitError(f"{name}: row {first_line_of(escaping)} has id {value!r}, which is not a plain file name "
                       f"({int(escaping.sum()):,} such rows); ids name files in train/ and test/ (the competition's "
                       f"are 40 hexadecimal digits)")


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

def inspect_image(path: str | Path) -> tuple[np.ndarray | None, str | None]:
    """Decode one patch as RGB uint8 (96, 96, 3), or say in a few words what is wrong with the file."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        try:
            size = Path(path).stat().st_size
        except FileNotFoundError:
            return None, "missing"
        if size == 0:
            return None, "empty file, 0 bytes"
        return None, f"cannot decode {size:,} bytes: truncated or not a TIFF"
    if image.dtype != np.uint8 or image.shape != (IMAGE_SIZE, IMAGE_SIZE, CHANNELS):
        shape = "×".join(map(str, image.shape))
        return None, f"{shape} {image.dtype}, not {IMAGE_SIZE}×{IMAGE_SIZE}×{CHANNELS} uint8 RGB"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), None    # OpenCV decodes to BGR


def bad_images_error(problems: list[tuple[Path, str]], total: int, advice: str | None = None) -> KitError:
    """One line for every bad image of a pass: the count, the first few files with what is wrong, what to do."""
    shown = ", ".join(f"{path.parent.name}/{path.name} ({why})" for path, why in problems[:SHOWN_PROBLEMS])
    more = f" and {len(problems) - SHOWN_PROBLEMS:,} more" if len(problems) > SHOWN_PROBLEMS else ""
    data_dir = problems[0][0].parent.parent
    return KitError(f"{len(problems):,} of {total:,} images in {data_dir} cannot be used: {shown}{more}; "
                    + (advice if advice is not None else repair_hint(data_dir)))


def read_image(path: str | Path) -> np.ndarray:
    """Decode one patch as RGB uint8 (96, 96, 3); a missing, unreadable or wrongly shaped file is named."""
    image, problem = inspect_image(path)
    if problem is not None:
        raise bad_images_error([(Path(path), problem)], 1)
    return image


def image_paths(image_dir: Path, ids) -> list[Path]:
    return [image_dir / f"{image_id}{IMAGE_SUFFIX}" for image_id in ids]


def check_test_images(data_dir: Path) -> int:
    """Every id of sample_submission.csv has a non-empty file in test/: checked before training starts (a stat per
    file, seconds for the competition's 57,458), so a missing test set does not surface after hours of training.
    Returns the count."""
    paths = image_paths(data_dir / TEST_DIR, read_sample_submission(data_dir)["id"])
    problems = []
    for path in paths:
        try:
            if path.stat().st_size == 0:
                problems.append((path, "empty file, 0 bytes"))
        except OSError:
            problems.append((path, "missing"))
    if problems:
        raise bad_images_error(problems, len(paths), "the test set is needed to predict, so nothing was trained; "
                                                     + repair_hint(data_dir))
    return len(paths)


def source_fingerprint(paths: list[Path], csv_name: str) -> str:
    """Hash of every file's name, size, mtime, ctime and inode, in order: any change to the source changes it,
    including a rewrite that restores size and mtime (the kernel sets ctime; no copy tool can)."""
    digest = hashlib.sha1()
    missing = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:
            missing.append(path)
            continue
        digest.update(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}\t{stat.st_ino}\n".encode())
    if missing:
        names = ", ".join(p.name for p in missing[:SHOWN_PROBLEMS])
        more = f" and {len(missing) - SHOWN_PROBLEMS:,} more" if len(missing) > SHOWN_PROBLEMS else ""
        count = "1 image listed in {} is" if len(missing) == 1 else f"{len(missing):,} images listed in {{}} are"
        raise KitError(f"{count.format(csv_name)} missing from {missing[0].parent}: {names}{more}; {get_data_hint()}")
    return digest.hexdigest()


def _decode_into(task: tuple[array_cache.RowWriter | None, int, list[str]]) -> tuple[int, int, list]:
    """Decode a chunk of paths starting at row `first` into the cache being built, in one write (no pixels travel
    between processes); with no writer, only check them. Returns the chunk's first row, its count and each bad file
    with what is wrong (a chunk with one is not written: the build fails)."""
    writer, first, paths = task
    decoded = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, CHANNELS), np.uint8)
    problems = []
    for row, path in enumerate(paths):
        image, problem = inspect_image(path)
        if problem is None:
            decoded[row] = image
        else:
            problems.append((path, problem))
    if writer is not None and not problems:
        writer.write(first, decoded)
    return first, len(paths), problems


@contextmanager
def one_opencv_thread():
    """Worker processes forked in this block get one OpenCV thread each (a process per core already): set before the
    fork, as OpenCV's thread pool does not survive one (set in a child, it hangs once the parent has used it)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def decode_images(paths: list[Path], writer: array_cache.RowWriter | None, workers: int, desc: str,
                  progress: bool = True, start: int = 0, problems: list | None = None) -> Iterator[tuple[int, int]]:
    """Decode `paths[start:]` in parallel, with a progress bar, into the cache being built through `writer` (None:
    only check them), yielding each chunk of good images (first row, count) once written, in any order. Every bad
    file is found in the one pass and added to `problems` with what is wrong; with a writer, the build then fails."""
    problems = [] if problems is None else problems
    chunk = max(16, min(256, -(-(len(paths) - start) // (4 * workers))))    # ≥ 4 chunks a worker: they end together
    tasks = [(writer, first, [str(p) for p in paths[first:first + chunk]]) for first in range(start, len(paths), chunk)]
    with progress_bar(total=len(paths), initial=start, desc=desc, unit="img", hidden=not progress) as bar:
        for first, count, bad in array_cache.in_workers(_decode_into, tasks, workers, one_opencv_thread):
            bar.update(count)
            problems += [(Path(path), why) for path, why in bad]
            if not bad:
                yield first, count
    if problems and writer is not None:
        raise bad_images_error(sorted(problems), len(paths))


def find_bad_images(paths: list[Path], workers: int | None = None, desc: str = "verify",
                    progress: bool = True) -> list[tuple[Path, str]]:
    """Every file of `paths` that is missing or does not decode as a 96×96×3 uint8 patch, with what is wrong."""
    problems = []
    for _ in decode_images(paths, None, workers or os.cpu_count() or 1, desc, progress, problems=problems):
        pass
    return sorted(problems)


def cache_dir_for(cfg, data_dir: str | Path) -> Path:
    """One cache folder per data folder, so two data sets never evict each other's cache: under the config's
    `cache_dir` (e.g. a machine's local disk while runs go to shared storage), else under `out_dir`/cache."""
    source = Path(data_dir).resolve()
    root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out_dir) / "cache"
    return root / f"{source.name}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}"


def load_split_images(data_dir: str | Path, split: str, ids, cache_dir: str | Path,
                      workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Return the split's images (N, 96, 96, 3) uint8 RGB in `ids` order, memory-mapped from the cache.

    The cache (kit/array_cache.py) is built on first need, rebuilt when the source files change or the file does not
    read back, and continued where a stopped build left it. One process builds a split's cache at a time (a lock in
    the cache folder); another one waits for it and then uses its cache.
    """
    image_dir = Path(data_dir) / (TRAIN_DIR if split == "train" else TEST_DIR)
    paths = image_paths(image_dir, ids)
    fingerprint = source_fingerprint(paths, TRAIN_LABELS_CSV if split == "train" else SAMPLE_SUBMISSION_CSV)
    cache_dir, workers = Path(cache_dir), workers or os.cpu_count() or 1
    cache = array_cache.CachedArray(cache_dir / f"{split}-{len(paths)}-{fingerprint[:16]}.npy",
                                    (len(paths), IMAGE_SIZE, IMAGE_SIZE, CHANNELS), np.uint8,
                                    f"the {split} image cache", "images")

    def build(missing: list[array_cache.CachedArray]) -> None:
        # what earlier builds left: caches of other source files, their partial builds, killed writes' temp files
        stale = [path for path in array_cache.cache_files(cache_dir, f"{split}-*.npy")
                 if path not in (cache.partial, cache.rows_file)]
        array_cache.remove_leftovers(stale, f"stale {split} cache files", cache_dir)
        array_cache.build_array(cache, lambda writer, start: decode_images(paths, writer, workers, f"cache {split}",
                                                                           progress, start))

    return array_cache.cached_arrays([cache], cache_dir / f"{split}.lock", build,
                                     f"building the {split} cache in {cache_dir}")[0]
