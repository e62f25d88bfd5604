"""Faults at the edges: OS errors as one line (read-only, a file where a folder goes, disk full), nothing stale or
half-built left behind, Ctrl-C that says what was kept, padded ids named as such."""

import errno
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import kit.io
from kit.array_cache import MOVE_CACHE
from kit.cli import main
from kit.data import ROW_BYTES, cache_dir_for, load_split_images, read_image, read_train_labels
from kit.errors import Interrupted, KitError
from kit.fold import train_fold
from kit.runs import LAST, fold_dir

from conftest import REPO, as_from_a_terminal, lock_held_elsewhere

QUIET = {"log": lambda *_: None}
PROGRESS_BAR = re.compile(r"^(cache \w+|fold \d+ epoch \d+/\d+|verify images):|^\s+$")


def one_line_error(capsys) -> str:
    """The one `error:` line a failed command ends with (progress bars before it aside), and nothing else."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert [line for line in lines if not PROGRESS_BAR.match(line)] == lines[-1:], err
    return lines[-1]


def experiment_args(cfg) -> list[str]:
    return ["--config", "configs/demo.yaml", "--data-dir", cfg.data_dir, "--out", cfg.out_dir,
            f"submissions_dir={cfg.submissions_dir}", "folds.n_splits=2", "epochs=1", "batch_size=32"]


@contextmanager
def tiny_disk(path: Path, size: str):
    """A real small file system (tmpfs) at `path`; the test is skipped, saying why, where mounting is refused (not
    root, no mount command, a container without the capability)."""
    path.mkdir(parents=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True)
    except OSError as err:
        pytest.skip(f"cannot run `mount` here ({err}); the simulated variants cover this")
    if mounted.returncode != 0:
        why = (mounted.stderr.strip().splitlines() or [f"exit status {mounted.returncode}"])[0]
        pytest.skip(f"cannot mount a tmpfs here ({why}; needs root); the simulated variants cover this")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount {path} read-only here ({remounted.stderr.strip()}); the simulated variant "
                    f"(test_read_only_out_is_named_before_training) covers this")


# ---- OUT that cannot be written: said before any work --------------------------------------------------------------

@pytest.mark.parametrize("command", [["cache"], ["train", "--fold", "0"], ["train-all"], ["predict"], ["report"]])
def test_out_that_is_a_file_is_one_line_before_any_work(quick_config, tmp_path, capsys, command):
    cfg = quick_config(out_dir=str(tmp_path / "runs-file"))
    Path(cfg.out_dir).write_text("not a folder")
    assert main(command + experiment_args(cfg)) == 2
    err = one_line_error(capsys)
    assert f"OUT={cfg.out_dir} cannot be a folder: {cfg.out_dir} is a file" in err
    assert Path(cfg.out_dir).read_text() == "not a folder"


def test_read_only_out_is_named_before_training(quick_config, tmp_path, capsys, monkeypatch):
    """Simulated (CI runs as root, who may write anywhere): every file creation under OUT fails with EROFS."""
    cfg = quick_config()
    real_mkstemp = tempfile.mkstemp

    def read_only_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(cfg.out_dir):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(kit.io.tempfile, "mkstemp", read_only_mkstemp)
    assert main(["train", "--fold", "0"] + experiment_args(cfg)) == 2
    err = one_line_error(capsys)
    assert f"OUT={cfg.out_dir} is not writable: {cfg.out_dir} is read-only (a read-only file system); " \
           f"write elsewhere: OUT=" in err
    assert not any(Path(cfg.out_dir).rglob("*.npy")), "stopped before the cache build"


def test_read_only_and_full_disks_for_real(quick_config, tmp_path, capsys):
    """On a real 24 MB tmpfs: the 8.9 MB train cache is refused up front on a 5 MB one; with room for the cache but
    not for a checkpoint, the write fails as one line and no half file stays; remounted read-only, OUT is named."""
    with tiny_disk(tmp_path / "small", "5m") as small:
        cfg = quick_config(out_dir=str(small / "runs"))
        assert main(["train", "--fold", "0"] + experiment_args(cfg)) == 2
        err = one_line_error(capsys)
        assert "not enough disk for the train image cache: 320 images need 8.9 MB in " in err and " free there" in err
        assert err.endswith("; free some space or " + MOVE_CACHE) and "OUT=" not in err
        assert not list(Path(cfg.out_dir).rglob("*.npy*")) and not list(Path(cfg.out_dir).rglob(".*.tmp"))

    with tiny_disk(tmp_path / "medium", "24m") as medium:
        cfg = quick_config(out_dir=str(medium / "runs"))
        assert main(["train", "--fold", "0"] + experiment_args(cfg)) == 2
        err = one_line_error(capsys)
        assert "error: disk full writing " in err and " free on that disk" in err
        assert not list(medium.rglob(".*.tmp")), "no temporary file left behind"
        remount_read_only(medium)
        assert main(["train", "--fold", "0"] + experiment_args(cfg)) == 2
        assert f"OUT={cfg.out_dir} is not writable: " in one_line_error(capsys)


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(quick_config, capsys, monkeypatch):
    """The write of last.pt hits a full disk (the kernel's /dev/full: every write ENOSPC): one line naming the file
    and the free space; the previous last.pt, and every other file, stays as it was."""
    cfg = quick_config(epochs=1, max_train_images=64)
    assert main(["train", "--fold", "0"] + experiment_args(cfg) + ["max_train_images=64"]) == 0
    last = fold_dir(cfg, 0) / LAST
    before = last.read_bytes()
    real_mkstemp = tempfile.mkstemp

    def full_disk_for_checkpoints(*args, prefix="", dir=None, **kwargs):
        handle, name = real_mkstemp(*args, prefix=prefix, dir=dir, **kwargs)
        if prefix == f".{LAST}.":
            os.close(handle)
            os.unlink(name)
            os.symlink("/dev/full", name)
            handle = os.open(name, os.O_WRONLY)
        return handle, name

    monkeypatch.setattr(kit.io.tempfile, "mkstemp", full_disk_for_checkpoints)
    capsys.readouterr()
    assert main(["train", "--fold", "0"] + experiment_args(cfg) + ["epochs=2", "max_train_images=64"]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: disk full writing {last}: ") and "free on that disk" in err
    assert "inline_container" not in err
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["epoch"] == 1
    assert not list(fold_dir(cfg, 0).glob(".*.tmp"))


def test_disk_full_inside_the_cache_workers_is_one_line(quick_config, tmp_path, capsys, monkeypatch):
    """The disk fills after the first 100 images (every write past them raises ENOSPC, in the forked workers too):
    one line naming the cache folder and the setting that moves it (cache_dir=, not OUT=), exit status 2, nothing
    with the final name; with room again the build continues from the images kept."""
    import kit.array_cache

    real_write = kit.array_cache.write_rows

    def full_after_100_images(path, position, rows):
        if position >= 100 * ROW_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, position, rows)

    cfg = quick_config(cache_dir=str(tmp_path / "cache"))
    cache_dir = cache_dir_for(cfg, cfg.data_dir)
    args = ["cache"] + experiment_args(cfg) + [f"cache_dir={cfg.cache_dir}"]              # the setting the line names
    monkeypatch.setattr(kit.array_cache, "write_rows", full_after_100_images)        # the forked workers inherit it
    assert main(args) == 2
    err = one_line_error(capsys)
    assert re.fullmatch(rf"error: disk full writing the train image cache in {re.escape(str(cache_dir))}: "
                        rf"[\d.,]+ [KMGT]?B(ytes)? free there; the \d+ images done are kept; free some space and rerun "
                        rf"to continue, or {re.escape(MOVE_CACHE)}", err), err
    assert "OUT=" not in err and not list(cache_dir.glob("train-*.npy")), "nothing has the final name"
    monkeypatch.setattr(kit.array_cache, "write_rows", real_write)
    assert main(args) == 0
    ids = read_train_labels(cfg.data_dir)["id"]
    images = load_split_images(cfg.data_dir, "train", ids, cache_dir)
    assert np.array_equal(images[-1], read_image(Path(cfg.data_dir) / "train" / f"{ids.iloc[-1]}.tif"))


FEATURES_ON_A_DISK_THAT_FILLS = """
import os, sys, torch
from kit import feature_cache
from kit.cli import run_reporting_errors
from kit.config import load_config
from kit.data import cache_dir_for, load_split_images, read_train_labels
from kit.models import build_model, set_frozen_head
from kit.weights import LITE0_TIMM_NAME

data, weights, out = sys.argv[1:4]
feature_cache.FEATURE_CHUNK = 5
cfg = load_config("effnet_b0", {"model.name": LITE0_TIMM_NAME, "model.pretrained": False, "tta.views": "none",
                                "model.pretrained_file": weights, "data_dir": data, "out_dir": out,
                                "train.frozen_features": True})
model = set_frozen_head(build_model(cfg.model), "linear").eval()
images = load_split_images(data, "train", read_train_labels(data)["id"], cache_dir_for(cfg, data), progress=False)

def fill_the_disk(view, done):       # once the first chunk is in, something else takes every byte left
    handle = os.open(os.path.join(feature_cache.feature_dir(cfg), "filler"), os.O_WRONLY | os.O_CREAT)
    for size in (1 << 16, 1 << 12, 1):
        try:
            while True:
                os.write(handle, bytes(size))
        except OSError:
            pass
    os.close(handle)

sys.exit(run_reporting_errors(lambda: feature_cache.cached_features(
    cfg, model, images, torch.device("cpu"), None, log=print, on_chunk=fill_the_disk)))
"""


def test_a_disk_that_fills_during_a_feature_build_for_real_is_one_line_not_a_bus_error(tmp_path):
    """The feature files on a real 1 MB tmpfs that fills after the first chunk: rows written through a memory map
    died of SIGBUS there (exit 135, "Bus error", no message); written with file writes, the build ends in one line."""
    from kit.config import load_config
    from kit.demo_data import make_demo_data
    from kit.feature_cache import feature_dir
    from kit.weights import LITE0_TIMM_NAME, write_lite0_imagenet_weights

    data = make_demo_data(tmp_path / "data", n_train=12, n_test=4, seed=5)
    weights = write_lite0_imagenet_weights(tmp_path / "lite0.pth")
    cfg = load_config("effnet_b0", {"model.name": LITE0_TIMM_NAME, "data_dir": str(data),
                                    "out_dir": str(tmp_path / "runs")})
    with tiny_disk(feature_dir(cfg), "1m") as folder:
        result = subprocess.run([sys.executable, "-c", FEATURES_ON_A_DISK_THAT_FILLS, str(data), str(weights),
                                 str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr and "Bus error" not in result.stderr
        assert last.startswith(f"error: disk full writing {LITE0_TIMM_NAME}'s features (view identity) in {folder}: ")
        assert last.endswith(f"; the 5 images done are kept; free some space and rerun to continue, or {MOVE_CACHE}")
        assert not list(folder.glob("train-*.npy")), "nothing has the final name"


# ---- leftovers -----------------------------------------------------------------------------------------------------

def test_a_dead_builds_temp_file_is_removed_and_a_live_builds_never(quick_config, tmp_path):
    cfg = quick_config(cache_dir=str(tmp_path / "cache"))                  # its own cache folder, not the shared one
    cache_dir = cache_dir_for(cfg, cfg.data_dir)
    cache_dir.mkdir(parents=True)
    leftover = cache_dir / ".train-320-0123456789abcdef.npy.k2x9q1.tmp"        # what `kill -9` mid-build leaves
    leftover.write_bytes(b"\0" * 1000)
    ids = read_train_labels(cfg.data_dir)["id"]

    # a build still running (it holds the split's lock): its file is never touched; the second process waits
    result = {}
    with lock_held_elsewhere(cache_dir / "train.lock"):     # then killed: its temp file is a dead build's leftover
        waiter = threading.Thread(target=lambda: result.update(
            images=load_split_images(cfg.data_dir, "train", ids, cache_dir, workers=1, progress=False)))
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive() and leftover.exists(), "waits for the live build and leaves its file alone"
    waiter.join(timeout=60)
    assert not leftover.exists() and len(result["images"]) == 320
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(["train.lock", Path(result["images"].filename).name])


def test_a_killed_runs_half_written_checkpoint_is_removed(quick_config):
    cfg = quick_config(epochs=1, max_train_images=64)
    train_fold(cfg, 0, **QUIET)
    leftover = fold_dir(cfg, 0) / ".last.pt.a8f3k2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train_fold(cfg, 0, **QUIET)                  # already trained: still, the crash's leftover goes
    assert not leftover.exists()


# ---- Ctrl-C --------------------------------------------------------------------------------------------------------

def test_ctrl_c_during_the_cache_build_says_what_was_kept_without_worker_noise(quick_config):
    """A real SIGINT to the whole process group, as a terminal sends it, while 2 worker processes decode."""
    cfg = quick_config()
    slow_build = (
        "import sys, time, kit.data\n"
        "real = kit.data.inspect_image\n"
        "def slow(path):\n"
        "    print('decoding', flush=True); time.sleep(0.02); return real(path)\n"
        "kit.data.inspect_image = slow\n"
        "from kit.cli import main\n"
        f"sys.exit(main({['cache'] + experiment_args(cfg)!r}))\n")
    build = subprocess.Popen([sys.executable, "-c", slow_build], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    try:
        assert "decoding" in build.stdout.readline()      # the workers have started
        time.sleep(0.5)
        os.killpg(build.pid, signal.SIGINT)
        _, err = build.communicate(timeout=60)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
    assert build.returncode == 130
    assert "Traceback" not in err and "ForkPoolWorker" not in err and "KeyboardInterrupt" not in err
    assert re.fullmatch(r"interrupted while building the train image cache: the \d+ images done are kept; rerun the "
                        r"same command to continue from there", err.strip().splitlines()[-1]), err
    assert not list(Path(cfg.out_dir).rglob("*.npy")), "nothing has the final name (the partial build is kept)"


def test_ctrl_c_during_training_names_the_saved_epochs(quick_config):
    cfg = quick_config(epochs=3, max_train_images=64)

    def ctrl_c_after_epoch_1(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as caught:
        train_fold(cfg, 0, on_epoch_end=ctrl_c_after_epoch_1, **QUIET)
    last = fold_dir(cfg, 0) / LAST
    assert str(caught.value) == (f"interrupted in epoch 2 of fold 0: epoch 1 is saved in {last}; rerun the same "
                                 f"command to resume from epoch 2")
    assert torch.load(last, weights_only=True)["epoch"] == 1


# ---- ids with whitespace -------------------------------------------------------------------------------------------

def test_an_id_with_whitespace_is_named_as_such_not_as_a_missing_file(data_copy):
    labels = pd.read_csv(data_copy / "train_labels.csv", dtype={"id": str})
    labels.loc[7, "id"] = labels.loc[7, "id"] + " "
    labels.to_csv(data_copy / "train_labels.csv", index=False)
    with pytest.raises(KitError) as caught:
        read_train_labels(data_copy)
    message = str(caught.value)
    assert f"row 9 has id '{labels.loc[7, 'id']}' with leading/trailing whitespace" in message
    assert "missing" not in message and "make data" not in message


def test_ctrl_c_while_predicting_says_no_submission_was_written(quick_config, monkeypatch):
    import kit.predict
    from kit import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    cfg = quick_config()
    monkeypatch.setattr(kit.predict, "predict_test", interrupted)
    with pytest.raises(Interrupted, match="interrupted while predicting: no submission was written"):
        api.predict(cfg)
    assert not list(Path(cfg.submissions_dir).glob("*.csv"))


def test_demo_data_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert main(["demo-data", "--out", str(tmp_path / "taken" / "demo")]) == 2
    assert f"DATA_DIR={tmp_path / 'taken' / 'demo'} cannot be a folder: {tmp_path / 'taken'} is a file" \
        in one_line_error(capsys)


def test_a_missing_test_image_stops_training_before_it_starts(quick_config, data_copy):
    cfg = quick_config(epochs=1, data_dir=str(data_copy))
    first = pd.read_csv(data_copy / "sample_submission.csv", dtype={"id": str})["id"].iloc[0]
    (data_copy / "test" / f"{first}.tif").unlink()
    with pytest.raises(KitError, match=rf"1 of 48 images in {data_copy} cannot be used: test/{first}.tif \(missing\); "
                                       r"the test set is needed to predict, so nothing was trained; run `make data"):
        train_fold(cfg, 0, log=lambda *_: None)
    from kit.runs import fold_dir
    assert not (fold_dir(cfg, 0) / "last.pt").exists()
