"""The one on-disk array cache that every cached array goes through (the uint8 image cache in kit/data.py, the
frozen features in kit/feature_cache.py): a .npy file built once, under a lock, in resumable steps, then memory-mapped
read-only by every process that needs it.

    <name>.npy             the array: it appears (one rename) only once every row is in
    .<name>.npy.partial    a build under way: the header and the full size up front, rows written in place
    .<name>.npy.rows       how many rows of the partial are in (a prefix): a stopped build continues from there

Rows are written with plain file writes, never through a writable memory map: a full disk is then an OSError
(ENOSPC) that ends in one line naming the cache folder and the setting that moves it, instead of a SIGBUS (exit 135,
no message) at whichever page fault found no room. The free space is checked before a build starts. A file that does
not read back as the shape and dtype it must have (truncated, another array, a corrupt or pickled header) is removed
and built again, with one line saying so: no file is trusted because it exists.

A build's rows may come from worker processes (`in_workers`), each writing its own. Once built, the image cache is also
held in GPU memory when it fits there (`resident_images`), so training batches are gathered on the device.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .device import spare_memory
from .errors import Interrupted, KitError, first_line
from .io import DISK_FULL, WRITE_ERRORS, free_bytes, human_bytes, process_lock

# the setting that moves a cache (OUT= does not, once cache_dir is set)
MOVE_CACHE = "put the cache on a disk with room: cache_dir=/path in the config (ARGS='cache_dir=/path' with make)"
HEADER_ROOM = 4096            # a .npy header takes 64 to a few hundred bytes
SHOWN_FILES = 3               # files named in a "removed" line; the rest are counted
RESIDENT_SHARE = 0.5          # keep a split in GPU memory when it takes at most this share of the spare memory


def say(line: str) -> None:
    print(line, file=sys.stderr)


@dataclass(frozen=True)
class CachedArray:
    """One cache file and what it must hold."""
    path: Path
    shape: tuple
    dtype: np.dtype
    what: str                 # in messages: "the train image cache", "resnet18's features (view h1)"
    unit: str = "rows"        # what a row is, in messages: "images"

    @property
    def partial(self) -> Path:
        return self.path.with_name(f".{self.path.name}.partial")

    @property
    def rows_file(self) -> Path:
        return self.path.with_name(f".{self.path.name}.rows")

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize


def shape_text(shape: tuple, dtype) -> str:
    return f"{'×'.join(map(str, shape)) or 'scalar'} {np.dtype(dtype)}"


def why_unreadable(path: Path, shape: tuple, dtype) -> str | None:
    """Why `path` is not a whole .npy array of `shape` and `dtype` (None: it is). An OSError (absent, unreadable) is
    raised: such a file is not rebuilt."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, fortran_order, found_dtype = read_header(handle)
            offset, size = handle.tell(), os.fstat(handle.fileno()).st_size
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        return f"not a .npy array: {first_line(err)}"
    if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran_order:
        order = " in Fortran order" if fortran_order else ""
        return f"it holds {shape_text(found_shape, found_dtype)}{order}, not {shape_text(shape, dtype)}"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if size != expected:
        return f"{'truncated' if size < expected else 'too long'}: {size:,} bytes, not {expected:,}"
    return None


def open_array(array: CachedArray) -> tuple[np.ndarray | None, str | None]:
    """(the file memory-mapped read-only, None) when it reads back; (None, why not) when not; (None, None): absent."""
    try:
        problem = why_unreadable(array.path, array.shape, array.dtype)
        return (np.load(array.path, mmap_mode="r"), None) if problem is None else (None, problem)
    except FileNotFoundError:
        return None, None


def cached_arrays(arrays: list[CachedArray], lock: Path, build: Callable[[list[CachedArray]], None], doing: str,
                  log=say) -> list[np.ndarray]:
    """Every array of `arrays`, memory-mapped read-only. Those missing, or there but not reading back (removed first,
    with one line), are made by `build(missing)` (which calls `build_array` for each) holding `lock`: one process
    builds at a time; another waits (saying it waits for the holder, which is `doing`) and then uses what it built."""
    opened = [open_array(array)[0] for array in arrays]
    if all(found is not None for found in opened):
        return opened
    with process_lock(lock, "", wait=True, on_wait=lambda holder: log(f"waiting for {holder}, which is {doing}")):
        missing = []
        for array in arrays:
            found, problem = open_array(array)
            if problem is not None:
                array.path.unlink(missing_ok=True)
                log(f"{array.what}: {array.path} does not read back ({problem}); removed, building it again")
            if found is None:
                missing.append(array)
        if missing:
            build(missing)
    opened = []
    for array in arrays:
        found, problem = open_array(array)
        if found is None:
            raise KitError(f"{array.what}: {array.path} does not read back right after its build "
                           f"({problem or 'it is missing'}); remove the folder {array.path.parent} and rerun")
        opened.append(found)
    return opened


# ----------------------------------------------------------------------------------------------------------------
# A build
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowWriter:
    """Where rows go in a build's partial file; plain and picklable, so worker processes write their own rows."""
    path: str
    offset: int               # the header's bytes
    row_bytes: int
    dtype: str

    def write(self, first_row: int, rows: np.ndarray) -> None:
        write_rows(self.path, self.offset + first_row * self.row_bytes, np.asarray(rows, dtype=self.dtype))


def write_rows(path: str, position: int, rows: np.ndarray) -> None:
    """`rows` at byte `position` of `path`, in one file write: a full disk raises OSError(ENOSPC) here."""
    with open(path, "r+b") as handle:
        handle.seek(position)
        handle.write(np.ascontiguousarray(rows).data)


def _ignore_ctrl_c() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them: no "Process ForkPoolWorker-1:" tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def in_workers(function, tasks: list, workers: int, forking=nullcontext) -> Iterator:
    """`function(task)` of every task as each finishes, in `workers` forked processes (this one when 1): fork is
    fast and needs no re-import (the platform's default elsewhere); the pool is created inside `forking()` and
    stopped when the caller stops (an error, Ctrl-C), with no tracebacks of its own."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    with forking():
        pool = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None).Pool(
            min(workers, len(tasks)), initializer=_ignore_ctrl_c)
    try:
        yield from pool.imap_unordered(function, tasks)
    finally:
        pool.terminate()


def rows_done(array: CachedArray) -> int:
    """The rows a stopped build of `array` left in its partial file (0: none, or a partial of another shape)."""
    try:
        done = int(array.rows_file.read_text())
        if why_unreadable(array.partial, array.shape, array.dtype) is None and 0 <= done <= array.shape[0]:
            return done
    except (OSError, ValueError):
        pass
    return 0


def start_partial(array: CachedArray) -> None:
    """The partial file: its header, and its full size as a hole the rows fill (disk is taken as they are written)."""
    array.path.parent.mkdir(parents=True, exist_ok=True)
    with open(array.partial, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(array.dtype)),
                                                      "fortran_order": False, "shape": tuple(array.shape)})
        handle.truncate(handle.tell() + array.shape[0] * array.row_bytes)
    array.rows_file.write_text("0")


def header_bytes(path: Path) -> int:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(handle)
        return handle.tell()


def build_array(array: CachedArray, fill: Callable[[RowWriter, int], Iterator[tuple[int, int]]], log=say) -> int:
    """Make `array`'s file, continuing a stopped build; returns the rows computed. Call it holding the cache's lock.

    `fill(writer, start)` writes rows `start`… with `writer` (itself, or in worker processes it hands the writer to)
    and yields each span `(first row, count)` once written, in any order. After each, the rows done from the start
    without a gap are synced to disk and then counted (so a stopped build loses at most the spans in flight); the
    final name appears once every row is in. The counter is rewritten in place: a torn write leaves a prefix of its
    digits, a smaller count, which only costs rows computed again."""
    total, folder = array.shape[0], array.path.parent
    start = done = rows_done(array)
    needed, free = (total - done) * array.row_bytes + HEADER_ROOM, free_bytes(folder)
    if needed > free:
        raise KitError(f"not enough disk for {array.what}: {total - done:,} {array.unit} need {human_bytes(needed)} "
                       f"in {folder}, {human_bytes(free)} free there; free some space or {MOVE_CACHE}")
    if done:
        log(f"{array.what}: continuing a stopped build, {done:,} of {total:,} {array.unit} already in")
    try:
        if not done:
            start_partial(array)
        writer = RowWriter(str(array.partial), header_bytes(array.partial), array.row_bytes, np.dtype(array.dtype).str)
        with open(array.partial, "rb+") as synced, closing(fill(writer, done)) as spans:
            ends = {}
            for first, count in spans:
                ends[first] = first + count
                before = done
                while done in ends:
                    done = ends.pop(done)
                if done > before:
                    os.fdatasync(synced.fileno())            # the rows on disk before they count
                    array.rows_file.write_text(str(done))
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while building {array.what}: the {kept(array):,} {array.unit} done are kept; "
                          f"rerun the same command to continue from there") from None
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        raise KitError(write_error(array, err)) from None
    if done != total:
        raise KitError(f"{array.what}: the build ended at {done:,} of {total:,} {array.unit} (a gap in what it "
                       f"wrote); rerun to continue from there")
    os.replace(array.partial, array.path)
    array.rows_file.unlink(missing_ok=True)
    return total - start


def kept(array: CachedArray) -> int:
    try:
        return int(array.rows_file.read_text())
    except (OSError, ValueError):
        return 0


def write_error(array: CachedArray, err: OSError) -> str:
    """A failed write of a cache in one line: the folder, the cause, what was kept, and how to move the cache."""
    folder = array.path.parent
    kept_rows = f"the {kept(array):,} {array.unit} done are kept"
    if err.errno in DISK_FULL:
        return (f"disk full writing {array.what} in {folder}: {human_bytes(free_bytes(folder))} free there; "
                f"{kept_rows}; free some space and rerun to continue, or {MOVE_CACHE}")
    return f"cannot write {array.what} in {folder} ({err.strerror or err}); {kept_rows}; {MOVE_CACHE}"


# ----------------------------------------------------------------------------------------------------------------
# Leftovers
# ----------------------------------------------------------------------------------------------------------------

def cache_files(folder: Path, name_glob: str) -> list[Path]:
    """Every file of the cache files whose names match `name_glob`: the arrays, their builds' partial files and
    counters, and the temporary files of a killed atomic write."""
    if not folder.is_dir():
        return []
    patterns = (name_glob, f".{name_glob}.partial", f".{name_glob}.rows", f".{name_glob}.*.tmp")
    return sorted({path for pattern in patterns for path in folder.glob(pattern)})


def remove_leftovers(paths: list[Path], what: str, folder: Path, log=say) -> None:
    """Delete `paths` (of no more use: call it holding the lock of whatever writes them), said in one line."""
    removed, size = [], 0
    for path in paths:
        try:
            size += path.stat().st_blocks * 512          # the disk they took (a partial file is sparse)
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    if removed:
        more = f" and {len(removed) - SHOWN_FILES:,} more" if len(removed) > SHOWN_FILES else ""
        log(f"removed {what} from {folder} ({human_bytes(size)}): {', '.join(removed[:SHOWN_FILES])}{more}")


# ----------------------------------------------------------------------------------------------------------------
# In GPU memory
# ----------------------------------------------------------------------------------------------------------------

_RESIDENT: dict[str, tuple[tuple, torch.Tensor]] = {}     # device → (which split, its copy): one split per device


def resident_images(images, device: torch.device):
    """The split as a uint8 tensor in GPU memory when it fits with room to spare, so batches are gathered there and
    never cross PCIe; otherwise `images` as given (the memory-mapped cache, read batch by batch).

    The copy is kept for the process: every fold of `train-all` (and its validation) reuses it instead of uploading
    6 GB again. Another split replaces it. The fit check counts the memory PyTorch has cached as free.
    """
    if isinstance(images, torch.Tensor) or device.type != "cuda":
        return images
    key = (str(getattr(images, "filename", id(images))), getattr(images, "offset", 0), images.shape)
    held = _RESIDENT.get(str(device))
    if held is not None and held[0] == key:
        return held[1]
    _RESIDENT.pop(str(device), None)           # the other split's memory goes back to PyTorch's cache first
    del held
    if not fits_resident(images.nbytes, device):
        return images
    resident = torch.empty(images.shape, dtype=torch.uint8, device=device)
    chunk = 8192                               # bounded host memory: the cache is read a slice at a time
    for start in range(0, len(images), chunk):
        resident[start:start + chunk].copy_(torch.from_numpy(np.array(images[start:start + chunk])).pin_memory(),
                                            non_blocking=True)
    _RESIDENT[str(device)] = (key, resident)
    return resident


def fits_resident(nbytes: int, device: torch.device) -> bool:
    """Whether a split of `nbytes` is held in GPU memory: at most RESIDENT_SHARE of the spare memory, leaving the
    rest to the model's activations."""
    return device.type == "cuda" and nbytes <= RESIDENT_SHARE * spare_memory(device)


def resident_bytes(device: torch.device) -> int:
    """The bytes of the split this process holds in `device`'s memory (0 when none)."""
    held = _RESIDENT.get(str(device))
    return int(held[1].nbytes) if held is not None else 0
