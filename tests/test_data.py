import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kit.data import check_data_dir, load_split_images, read_image, read_sample_submission, read_train_labels
from kit.errors import Interrupted, KitError

from conftest import REPO


def test_demo_data_follows_the_kaggle_layout(demo_data):
    labels = pd.read_csv(demo_data / "train_labels.csv", dtype={"id": str})
    sample = pd.read_csv(demo_data / "sample_submission.csv", dtype={"id": str})
    assert list(labels.columns) == ["id", "label"] == list(sample.columns)
    for frame, folder in ((labels, "train"), (sample, "test")):
        assert frame["id"].str.fullmatch(r"[0-9a-f]{40}").all() and frame["id"].is_unique
        assert sorted(p.stem for p in (demo_data / folder).glob("*.tif")) == sorted(frame["id"])
    assert set(labels["label"]) == {0, 1} and 0.3 < labels["label"].mean() < 0.5
    assert (sample["label"] == 0).all() and sample["id"].tolist() != sorted(sample["id"])
    image = cv2.imread(str(demo_data / "train" / f"{labels['id'][0]}.tif"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8


def test_read_image_returns_rgb(tmp_path):
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[..., 0] = 200                                            # pure red in RGB
    cv2.imwrite(str(tmp_path / "a.tif"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(read_image(tmp_path / "a.tif"), rgb)


def test_cache_equals_direct_decoding_and_is_reused(demo_data, tmp_path):
    ids = read_train_labels(demo_data)["id"]
    cached = load_split_images(demo_data, "train", ids, tmp_path / "cache", workers=2)
    assert cached.shape == (len(ids), 96, 96, 3) and cached.dtype == np.uint8
    for row in (0, 17, len(ids) - 1):
        assert np.array_equal(cached[row], read_image(demo_data / "train" / f"{ids[row]}.tif"))
    files = list((tmp_path / "cache").iterdir())
    again = load_split_images(demo_data, "train", ids, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == files and np.array_equal(again, cached)


@pytest.mark.parametrize("how", ["new mtime", "cp -p", "touch -r"])
def test_changed_source_rebuilds_the_cache(data_copy, tmp_path, how):
    """A rewrite that keeps size and mtime (every Kaggle TIFF has the same size) must not serve stale pixels."""
    ids = read_sample_submission(data_copy)["id"]
    path, donor = (data_copy / "test" / f"{ids[i]}.tif" for i in (3, 4))
    for tif in (path, donor):               # uncompressed, as Kaggle's: every file the same size
        cv2.imwrite(str(tif), cv2.imread(str(tif)), [cv2.IMWRITE_TIFF_COMPRESSION, 1])
    os.utime(donor, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    subprocess.run(["cp", "-p", str(path), str(tmp_path / "reference.tif")], check=True)
    before = load_split_images(data_copy, "test", ids, tmp_path / "cache")
    kept = path.stat()
    time.sleep(0.05)                        # past the file system's coarse clock tick
    new = read_image(donor)
    if how == "new mtime":
        new = np.full((96, 96, 3), 7, np.uint8)
        cv2.imwrite(str(path), new)
        os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns + 10**9))
    elif how == "cp -p":                    # another file of the same size and mtime copied over it
        subprocess.run(["cp", "-p", str(donor), str(path)], check=True)
    else:                                   # edited in place, then the old mtime put back
        cv2.imwrite(str(path), cv2.cvtColor(new, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_TIFF_COMPRESSION, 1])
        subprocess.run(["touch", "-r", str(tmp_path / "reference.tif"), str(path)], check=True)
    if how != "new mtime":
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (kept.st_size, kept.st_mtime_ns)
    after = load_split_images(data_copy, "test", ids, tmp_path / "cache")
    assert np.array_equal(after[3], new) and not np.array_equal(before[3], after[3])
    assert len(list((tmp_path / "cache").glob("test-*.npy"))) == 1   # the stale cache is gone


def damage(data_dir, how):
    labels = pd.read_csv(data_dir / "train_labels.csv", dtype={"id": str})
    victim = data_dir / "train" / f"{labels['id'][5]}.tif"
    if how == "missing_tif":
        victim.unlink()
    elif how == "truncated_tif":
        victim.write_bytes(victim.read_bytes()[:300])
    elif how == "not_a_tif":
        victim.write_text("hello")
    elif how == "wrong_size":
        cv2.imwrite(str(victim), np.zeros((64, 64, 3), np.uint8))
    elif how == "grayscale":
        cv2.imwrite(str(victim), np.zeros((96, 96), np.uint8))
    elif how == "bad_label":
        labels.loc[5, "label"] = 2
        labels.to_csv(data_dir / "train_labels.csv", index=False)
    elif how == "bad_header":
        labels.rename(columns={"label": "target"}).to_csv(data_dir / "train_labels.csv", index=False)
    elif how == "no_labels_csv":
        (data_dir / "train_labels.csv").unlink()
    return victim


def test_a_missing_image_is_named_before_any_decoding(data_copy, tmp_path):
    victim = damage(data_copy, "missing_tif")
    with pytest.raises(KitError) as caught:
        load_split_images(data_copy, "train", read_train_labels(data_copy)["id"], tmp_path / "cache", workers=2)
    assert "1 image listed in train_labels.csv is missing" in str(caught.value) and victim.name in str(caught.value)


def test_every_bad_image_of_a_split_is_named_in_one_pass(data_copy, tmp_path, capfd):
    """Three bad files cost one cache build, not three; OpenCV's own warnings stay silent."""
    from PIL import Image

    ids = read_train_labels(data_copy)["id"]
    victims = [data_copy / "train" / f"{ids[row]}.tif" for row in (5, 70, 200, 310)]
    victims[0].write_bytes(b"")                                            # zero bytes
    cv2.imwrite(str(victims[1]), np.zeros((64, 64, 3), np.uint8))          # wrong size
    cv2.imwrite(str(victims[2]), np.zeros((96, 96), np.uint8))             # grayscale
    # a TIFF whose header survives but whose strip is cut: this is what makes OpenCV print [ WARN]/[ERROR] lines
    Image.fromarray(np.full((96, 96, 3), 200, np.uint8)).save(victims[3])
    victims[3].write_bytes(victims[3].read_bytes()[:20000])
    capfd.readouterr()
    with pytest.raises(KitError) as caught:
        load_split_images(data_copy, "train", ids, tmp_path / "cache", workers=2)
    message = str(caught.value)
    assert message.startswith(f"4 of {len(ids):,} images in {data_copy} cannot be used: ")
    assert f"train/{victims[0].name} (empty file, 0 bytes)" in message
    assert f"train/{victims[1].name} (64×64×3 uint8, not 96×96×3 uint8 RGB)" in message
    assert f"train/{victims[2].name} (96×96 uint8, not 96×96×3 uint8 RGB)" in message
    assert f"train/{victims[3].name} (cannot decode 20,000 bytes: truncated or not a TIFF)" in message
    assert f"make data DATA_DIR={data_copy}" in message
    captured = capfd.readouterr()
    assert "WARN" not in captured.err and "ERROR" not in captured.err and "TIFFReadRGBAStrip" not in captured.err
    assert not list((tmp_path / "cache").glob("*.npy")), "a failed build must not leave a cache taken as complete"
    assert not list((tmp_path / "cache").glob(".*.tmp")), "nor its temporary file"


def test_more_bad_images_than_shown_are_counted(data_copy, tmp_path):
    ids = read_train_labels(data_copy)["id"]
    for row in range(12):
        (data_copy / "train" / f"{ids[row]}.tif").write_text("hello")
    with pytest.raises(KitError, match=r"12 of .* cannot be used: .* and 7 more; run `make data"):
        load_split_images(data_copy, "train", ids, tmp_path / "cache", workers=2)


@pytest.mark.parametrize("how, message", [
    ("bad_label", "row 7 has label 2; labels must be 0 or 1"),
    ("bad_header", "header must be `id,label`"),
    ("no_labels_csv", "lacks train_labels.csv: run `make data`"),
])
def test_bad_csvs_are_refused(data_copy, how, message):
    damage(data_copy, how)
    with pytest.raises(KitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_train_labels(check_data_dir(data_copy))


def test_missing_data_folder_points_at_make_data(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kit", "train", "--config", "configs/demo.yaml", "--fold", "0",
                             "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: data folder not found: {tmp_path / 'nowhere'}: run `make data` (or `make demo-data` for generated "
        f"data), or pass DATA_DIR=/path/to/data"]


def counting_decodes(monkeypatch, stop_after: int | None = None) -> list:
    """Every image kit.data decodes from now on, in a list; Ctrl-C instead of decode number `stop_after` + 1."""
    import kit.data

    real, decoded = kit.data.inspect_image, []

    def decode(path):
        if len(decoded) == stop_after:
            raise KeyboardInterrupt            # Ctrl-C in the middle of the build
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(kit.data, "inspect_image", decode)
    return decoded


def test_a_stopped_cache_build_continues_where_it_stopped(demo_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C at decode 251 of 320 (one process, chunks of 80): the 240 images written are kept, the final name is
    not taken, and the rerun decodes only the last 80, to the same array a build that never stopped makes."""
    ids = read_train_labels(demo_data)["id"]
    counting_decodes(monkeypatch, stop_after=250)
    with pytest.raises(Interrupted) as caught:
        load_split_images(demo_data, "train", ids, tmp_path / "cache", workers=1)
    assert str(caught.value) == ("interrupted while building the train image cache: the 240 images done are kept; "
                                 "rerun the same command to continue from there")
    assert not list((tmp_path / "cache").glob("train-*.npy")), "nothing has the final name"
    monkeypatch.undo()
    decoded = counting_decodes(monkeypatch)
    capsys.readouterr()
    images = load_split_images(demo_data, "train", ids, tmp_path / "cache", workers=1)
    assert len(decoded) == 80 and "continuing a stopped build, 240 of 320 images already in" in capsys.readouterr().err
    np.testing.assert_array_equal(images, load_split_images(demo_data, "train", ids, tmp_path / "straight"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(images.filename).name, "train.lock"]


def break_array_file(path: Path, how: str) -> None:
    if how == "truncated":                   # a copy cut short, a disk that filled: today's "mmap length is greater"
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    elif how == "another shape":
        np.save(path, np.zeros((10, 96, 96, 3), np.uint8))
    elif how == "pickled":
        np.save(path, np.array([{"rows": 1}, None], dtype=object), allow_pickle=True)
    else:                                    # a corrupt header
        with open(path, "r+b") as handle:
            handle.write(b"\0" * 64)


@pytest.mark.parametrize("how, why", [
    ("truncated", r"truncated: 4,423,744 bytes, not 8,847,488"),
    ("another shape", r"it holds 10×96×96×3 uint8, not 320×96×96×3 uint8"),
    ("pickled", r"it holds 2 object, not 320×96×96×3 uint8"),
    ("corrupt header", r"not a \.npy array: the magic string is not correct"),
])
def test_an_image_cache_that_does_not_read_back_is_rebuilt_with_one_line(demo_data, tmp_path, capsys, how, why):
    ids = read_train_labels(demo_data)["id"]
    cache = load_split_images(demo_data, "train", ids, tmp_path / "cache", workers=2)
    path, expected = Path(cache.filename), np.array(cache)
    del cache                                # no mapping of the file while it is cut (that would be a SIGBUS here)
    break_array_file(path, how)
    capsys.readouterr()
    rebuilt = load_split_images(demo_data, "train", ids, tmp_path / "cache", workers=2)
    said = [line for line in capsys.readouterr().err.splitlines() if "does not read back" in line]
    assert len(said) == 1 and said[0].startswith(f"the train image cache: {path} does not read back (")
    assert re.search(why, said[0]) and said[0].endswith("); removed, building it again"), said
    assert Path(rebuilt.filename) == path
    np.testing.assert_array_equal(rebuilt, expected)


def test_a_stale_partial_build_is_removed_with_one_line(data_copy, tmp_path, monkeypatch, capsys):
    """A build stopped on the old source files is of no use once they change: the next build removes it, saying so."""
    ids = read_sample_submission(data_copy)["id"]
    counting_decodes(monkeypatch, stop_after=20)
    with pytest.raises(Interrupted, match="the 16 images done are kept"):
        load_split_images(data_copy, "test", ids, tmp_path / "cache", workers=1)
    monkeypatch.undo()
    stale = sorted(p.name for p in (tmp_path / "cache").glob(".test-*"))
    assert len(stale) == 2 and stale[0].endswith(".npy.partial") and stale[1].endswith(".npy.rows")
    cv2.imwrite(str(data_copy / "test" / f"{ids[0]}.tif"), np.full((96, 96, 3), 9, np.uint8))
    capsys.readouterr()
    images = load_split_images(data_copy, "test", ids, tmp_path / "cache", workers=1)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("removed ")]
    assert len(said) == 1 and said[0].startswith(f"removed stale test cache files from {tmp_path / 'cache'} (")
    assert said[0].endswith(f"): {', '.join(stale)}")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(images.filename).name, "test.lock"]


def test_cache_build_after_opencv_used_its_threads_does_not_hang(demo_data, tmp_path):
    # OpenCV's thread pool does not survive fork: a worker that configured it hung the build (and `make predict`
    # after an in-process training run)
    code = ("import cv2, numpy as np, sys; from kit.data import load_split_images, read_sample_submission; "
            "cv2.GaussianBlur(np.zeros((1500, 1500, 3), np.uint8), (0, 0), 3); "
            "ids = read_sample_submission(sys.argv[1])['id']; "
            "print(load_split_images(sys.argv[1], 'test', ids, sys.argv[2], workers=2, progress=False).shape)")
    result = subprocess.run([sys.executable, "-c", code, str(demo_data), str(tmp_path / "cache")], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "(48, 96, 96, 3)", result.stderr[-2000:]


@pytest.mark.parametrize("bad_id", ["../outside/secret", "sub/dir", "..", "a\\b"])
def test_ids_are_plain_file_names_so_no_row_reads_outside_the_data_folder(data_copy, bad_id):
    outside = data_copy.parent / "outside"
    outside.mkdir(exist_ok=True)
    first = pd.read_csv(data_copy / "train_labels.csv", dtype={"id": str})["id"].iloc[0]
    (outside / "secret.tif").write_bytes((data_copy / "train" / f"{first}.tif").read_bytes())
    for csv, reader in (("train_labels.csv", read_train_labels), ("sample_submission.csv", read_sample_submission)):
        frame = pd.read_csv(data_copy / csv, dtype={"id": str})
        original = frame.copy()
        frame.loc[3, "id"] = bad_id
        frame.to_csv(data_copy / csv, index=False)
        with pytest.raises(KitError, match=rf"{csv}: row 5 has id .*, which is not a plain file name"):
            reader(data_copy)
        original.to_csv(data_copy / csv, index=False)
