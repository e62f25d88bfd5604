"""The file system, safely: atomic writes (a temporary file beside the target, then a rename, so a crash never leaves
half a file), OS errors in words ("disk full writing …: 12 MB free"), a writable-folder check before long work, and
the process lock that keeps two processes off the same fold or cache build."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from .errors import KitError

_UMASK = os.umask(0o022)
os.umask(_UMASK)

TEMP_SUFFIX = ".tmp"          # atomic_path's temporary files: `.<name>.<random>.tmp` beside the target
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# errors that mean "this place cannot be written", whatever the write was: said in words, as one line
WRITE_ERRORS = DISK_FULL + (errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                            errno.EEXIST)
WHERE_TO_WRITE = "write elsewhere: OUT= (or the config's out_dir) for runs, cache_dir= for caches, DATA_DIR= for data"


# ----------------------------------------------------------------------------------------------------------------
# OS errors in words
# ----------------------------------------------------------------------------------------------------------------

def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} TB"


def existing_ancestor(path: str | Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free space on the disk that holds `path` (or would hold it, once created)."""
    return shutil.disk_usage(existing_ancestor(path)).free


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest part of `path` (itself or a parent) that exists as a file, so no folder can be made there."""
    ancestor = existing_ancestor(path)
    return ancestor if ancestor.exists() and not ancestor.is_dir() else None


def os_error_message(err: OSError, path: str | Path | None = None) -> str:
    """One line naming the path and the cause in words, with what to do."""
    path = Path(path or err.filename or "?")
    code = err.errno
    if code in DISK_FULL:
        return (f"disk full writing {path}: {human_bytes(free_bytes(path))} free on that disk; free some space "
                f"(old runs, runs/cache) or {WHERE_TO_WRITE}; files written before are intact")
    if code == errno.EROFS:
        return f"{existing_ancestor(path)} is read-only (a read-only file system); {WHERE_TO_WRITE}"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to write {path}; fix the folder's permissions or {WHERE_TO_WRITE}"
    if code in (errno.ENOTDIR, errno.EEXIST) and file_in_the_way(path) is not None:
        return f"{file_in_the_way(path)} is a file, not a folder; remove it or {WHERE_TO_WRITE}"
    if code == errno.ENOENT:
        return f"{path} not found"
    return f"{path}: {err.strerror or err}"


def writing(path: str | Path, err: OSError) -> KitError | OSError:
    """A failed write of `path` as a KitError when the cause is the place (full, read-only, …), else `err`."""
    return KitError(os_error_message(err, path)) if err.errno in WRITE_ERRORS else err


def require_writable_dir(path: str | Path, label: str = "OUT") -> Path:
    """Make sure `path` is, or can be made, a folder this process can write, before any long work starts."""
    path = Path(path)
    if file_in_the_way(path) is not None:
        raise KitError(f"{label}={path} cannot be a folder: {file_in_the_way(path)} is a file; remove it or "
                       f"{WHERE_TO_WRITE}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise KitError(f"{label}={path} is not writable: " + os_error_message(err, path)) from None
    return path


def path_inside(root: str | Path, *parts: str | Path) -> Path:
    """`root`/`parts…`, refused unless it stays inside `root` once `..` and absolute parts are worked out: a name
    from a config or a CSV never writes or reads outside the folder it belongs to. (A folder the user has made a
    symbolic link is followed: where it points is the user's choice, not a name's.)"""
    root = Path(root)
    path = root.joinpath(*parts)
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([base, target]) != base or target == base:
        shown = "/".join(str(part) for part in parts)
        raise KitError(f"{shown!r} would lead outside {root}: names must be plain folder or file names (letters, "
                       f"digits, '.', '_', '-')")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------

@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename. A write that
    fails because of the place (disk full, read-only, …) ends in one KitError naming `path`; the old file stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(handle)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)     # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except OSError as err:
        raise writing(path, err) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json_lines(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when there is none); a half-written last line (a writer killed while
    appending) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def atomic_write_csv(path: str | Path, frame) -> None:
    """Write a pandas DataFrame without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def atomic_torch_save(path: str | Path, obj) -> None:
    """torch.save through a Python file object, so a full disk surfaces as the OSError(ENOSPC) it is, not as
    torch's "enforce fail at inline_container.cc … unexpected pos" (raised while closing the zip after it)."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as err:
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


def remove_temp_files(folder: str | Path, target_glob: str = "*") -> list[Path]:
    """Delete atomic_path's leftovers for targets matching `target_glob` in `folder` (a killed writer's). Call it
    only while holding the lock of whatever writes there, so no live writer's file is taken."""
    folder = Path(folder)
    removed = []
    for leftover in folder.glob(f".{target_glob}.*{TEMP_SUFFIX}") if folder.is_dir() else ():
        leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# The process lock
# ----------------------------------------------------------------------------------------------------------------

@contextmanager
def process_lock(path: str | Path, busy: str, wait: bool = False, on_wait=None):
    """Hold an exclusive `flock` on `path` for the block. When another process holds it: without `wait`, a KitError
    "`busy` is held by PID … on host since …"; with `wait`, call `on_wait(holder)` and block until it is free.

    `flock` belongs to the open file: the OS drops it when the holder exits or is killed, so no stale lock blocks.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # never through a symbolic link: a planted fold<k>.lock → elsewhere must not truncate its target
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise KitError(f"{path} is a symbolic link, not a lock file: the kit does not follow it; remove the "
                           f"link and rerun") from None
        raise writing(path, err) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise KitError(busy.format(holder=holder, path=path)) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"PID {os.getpid()} on {socket.gethostname()} since "
                          f"{datetime.now():%Y-%m-%d %H:%M:%S}\n".encode(), 0)
        yield
    finally:
        os.close(handle)       # releases the lock


# ----------------------------------------------------------------------------------------------------------------
# Time in file names
# ----------------------------------------------------------------------------------------------------------------

TIMESTAMP_FORMAT = "%Y%m%d-%H%M%S"       # in run-made file names: submissions, kaggle-run CSVs, bench and check reports
TIMESTAMP_PATTERN = r"\d{8}-\d{6}"      # the same, as a regular expression (report finds the newest by it)


def timestamp(now=None) -> str:
    """Now (or `now`, a datetime) as the kit writes it in file names: 20261201-231500."""
    return (now or datetime.now()).strftime(TIMESTAMP_FORMAT)
