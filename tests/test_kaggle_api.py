"""kit/kaggle_api.py: the Kaggle round trip through the real `kaggle` client (submit, list, `make data`), against
a fake Kaggle API on loopback (tests/fake_kaggle.py); nothing is sent without valid rows and credentials."""

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kit import api
from kit.cli import main
from kit.competition import TEST_IMAGES
from kit.errors import KitError
from kit.kaggle_api import submit


def competition_ids(count: int = TEST_IMAGES) -> list[str]:
    """Ids shaped like Kaggle's (40 hexadecimal digits), as many as its test set has."""
    return [hashlib.sha1(str(i).encode()).hexdigest() for i in range(count)]


def write_prediction(tmp_path, ids: list[str]) -> Path:
    """A valid submission as `make predict` leaves it: the CSV, its .json sidecar, and the sample it answers."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sample = pd.DataFrame({"id": ids, "label": 0})
    sample.to_csv(data_dir / "sample_submission.csv", index=False)
    path = tmp_path / "submissions" / "demo-20261125-101500.csv"
    path.parent.mkdir()
    sample.assign(label=np.linspace(0, 1, len(ids))).to_csv(path, index=False)
    path.with_suffix(".json").write_text(json.dumps({
        "experiment": "demo", "cv_auc": 0.98765, "folds": [0, 1, 2], "tta": "d4",
        "sample_submission": str(data_dir / "sample_submission.csv")}))
    return path


@pytest.fixture
def predicted(tmp_path):
    """A prediction of the competition's test set (its 57,458 rows)."""
    return write_prediction(tmp_path, competition_ids())


@pytest.fixture
def small_sample():
    """A five-row sample_submission, ids out of order."""
    return pd.DataFrame({"id": ["c3", "a1", "b2", "e5", "d4"], "label": 0})


def test_file_with_wrong_header_is_refused_before_upload(small_sample, tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"id": small_sample["id"], "target": 0.5}).to_csv(path, index=False)
    with pytest.raises(KitError, match="header must be `id,label`"):
        submit(path, small_sample, "msg")          # raises before any credential lookup or network call


def test_submit_without_credentials_says_how_to_provide_them(small_sample, tmp_path, no_kaggle_credentials, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    small_sample.to_csv(data_dir / "sample_submission.csv", index=False)
    path = tmp_path / "ok.csv"
    small_sample.assign(label=0.5).to_csv(path, index=False)
    code = main(["submit", "--file", str(path), "--data-dir", str(data_dir), "--force"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "kaggle.json" in err and "KAGGLE_USERNAME" in err
    assert "nothing was sent" in err


def test_submit_uploads_the_exact_bytes_with_experiment_and_cv_auc(fake_kaggle, predicted, capsys):
    assert main(["submit", "--file", str(predicted)]) == 0
    assert [name for name, _ in fake_kaggle.calls] == ["StartSubmissionUpload", "CreateSubmission"]
    (uploaded,) = fake_kaggle.uploads.values()
    assert uploaded == predicted.read_bytes()
    (created,) = fake_kaggle.submissions
    assert created["competitionName"] == "histopathologic-cancer-detection"
    assert created["submissionDescription"] == "demo | CV AUC 0.9877 | folds [0, 1, 2] | TTA d4"
    assert created["blobFileTokens"] == next(iter(fake_kaggle.uploads))
    assert fake_kaggle.auth_headers[0].startswith("Basic ")          # the legacy key, sent as basic auth
    out = capsys.readouterr().out
    assert "submitted" in out and "test-key-0123456789" not in out   # credentials are never printed


def test_message_override(fake_kaggle, predicted):
    api.submit(predicted, message="my own words")
    assert fake_kaggle.submissions[0]["submissionDescription"] == "my own words"


def test_invalid_csv_never_reaches_the_server(fake_kaggle, predicted, capsys):
    submission = pd.read_csv(predicted, dtype={"id": str})
    submission.loc[2, "id"] = "zz"
    submission.to_csv(predicted, index=False)
    assert main(["submit", "--file", str(predicted)]) == 2
    assert "row 4 has id zz, which is not in sample_submission.csv" in capsys.readouterr().err
    assert fake_kaggle.calls == [] and fake_kaggle.uploads == {}


def test_a_prediction_of_other_data_is_not_uploaded_without_force(fake_kaggle, tmp_path, capsys):
    """A CSV made from data/demo validates against the demo's own sample_submission.csv, but Kaggle can only reject
    it: refused unless FORCE=1; DRY_RUN=1 still validates it against the sample it answers."""
    demo_prediction = write_prediction(tmp_path, competition_ids(400))
    assert main(["submit", "--file", str(demo_prediction)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "has 400 rows, not the competition's 57,458 test ids" in err and "looks like a prediction of other " \
        "data (e.g. the demo)" in err and "nothing was sent" in err and "FORCE=1" in err
    assert fake_kaggle.calls == []

    assert main(["submit", "--file", str(demo_prediction), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "valid (400 rows, ids match sample_submission.csv)" in out and "to upload it, pass FORCE=1" in out
    assert fake_kaggle.calls == []

    assert main(["submit", "--file", str(demo_prediction), "--force"]) == 0
    assert [name for name, _ in fake_kaggle.calls] == ["StartSubmissionUpload", "CreateSubmission"]


def test_competition_sized_csv_with_foreign_ids_needs_force(fake_kaggle, tmp_path, capsys):
    ids = [f"demo-{i}" for i in range(TEST_IMAGES)]
    assert main(["submit", "--file", str(write_prediction(tmp_path, ids))]) == 2
    assert "ids such as 'demo-0', not the competition's (40 hexadecimal digits)" in capsys.readouterr().err
    assert fake_kaggle.calls == []


def test_rules_not_accepted_gives_a_clear_line(fake_kaggle, predicted, capsys):
    fake_kaggle.fail_status = 403
    assert main(["submit", "--file", str(predicted)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "HTTP 403" in err and "accept the competition rules at" in err and "/rules" in err
    assert fake_kaggle.submissions == []


def test_missing_credentials_send_nothing(fake_kaggle, predicted, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    assert main(["submit", "--file", str(predicted)]) == 2
    assert "no Kaggle credentials found" in capsys.readouterr().err
    assert fake_kaggle.calls == []


def test_submissions_lists_status_and_public_score(fake_kaggle, predicted, capsys):
    api.submit(predicted)
    capsys.readouterr()
    assert main(["submissions"]) == 0
    out = capsys.readouterr().out
    assert "COMPLETE" in out and "0.9712" in out and "demo | CV AUC 0.9877" in out


def zip_of(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()


def test_make_data_downloads_unzips_verifies_and_feeds_training(fake_kaggle, demo_data, tmp_path, capsys):
    fake_kaggle.data_zip = zip_of(demo_data)
    data_dir = tmp_path / "downloaded"
    assert main(["data", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "verified: 320 train / 48 test images" in out
    assert not (data_dir / "histopathologic-cancer-detection.zip").exists()
    assert sorted(p.name for p in (data_dir / "train").iterdir()) == sorted(p.name for p in (demo_data / "train").iterdir())

    calls = len(fake_kaggle.calls)
    assert main(["data", "--data-dir", str(data_dir)]) == 0           # complete: nothing downloaded again
    assert "nothing to download" in capsys.readouterr().out and len(fake_kaggle.calls) == calls

    # `make train` accepts the folder
    assert main(["train", "--config", "configs/demo.yaml", "--fold", "0", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "runs"), "epochs=1", "folds.n_splits=2"]) == 0
    assert (tmp_path / "runs" / "demo" / "fold0" / "best.pt").is_file()


def test_interrupted_unzip_is_finished_without_downloading_again(fake_kaggle, demo_data, tmp_path, capsys):
    fake_kaggle.data_zip = zip_of(demo_data)
    data_dir = tmp_path / "downloaded"
    data_dir.mkdir()
    (data_dir / "histopathologic-cancer-detection.zip").write_bytes(fake_kaggle.data_zip)   # download had finished
    with zipfile.ZipFile(data_dir / "histopathologic-cancer-detection.zip") as archive:
        names = [n for n in archive.namelist() if n.endswith(".tif")]
        for name in names[:200]:                                         # the unzip stopped part-way …
            archive.extract(name, data_dir)
    victim = data_dir / names[10]
    victim.write_bytes(victim.read_bytes()[:100])                        # … leaving one file truncated
    api.download_data(data_dir)
    out = capsys.readouterr().out
    # the zip is here: no download (no call to Kaggle at all), only the unzip resumes
    assert "histopathologic-cancer-detection.zip is here: unzipping and verifying it (nothing to download)" in out
    assert fake_kaggle.calls == []
    assert f"unzipped {len(names) + 2 - 199:,} of {len(names) + 2:,} files" in out
    assert victim.read_bytes() == (demo_data / names[10]).read_bytes()
    assert "kept: it was here before this run" in out


def test_make_data_unzips_a_browser_downloaded_zip_without_credentials(no_kaggle_credentials, demo_data, tmp_path,
                                                                       capsys):
    data_dir = tmp_path / "downloads"
    data_dir.mkdir()
    (data_dir / "histopathologic-cancer-detection.zip").write_bytes(zip_of(demo_data))
    assert main(["data", "--data-dir", str(data_dir)]) == 0
    assert "verified: 320 train / 48 test images" in capsys.readouterr().out


def test_a_data_folder_one_level_too_high_or_holding_only_the_zip_is_named(demo_data, tmp_path, capsys):
    outer = tmp_path / "downloads"
    shutil.copytree(demo_data, outer / "histopathologic-cancer-detection")
    assert main(["train", "--config", "configs/demo.yaml", "--fold", "0", "--data-dir", str(outer)]) == 2
    err = capsys.readouterr().err
    assert f"the data is one level down, in {outer / 'histopathologic-cancer-detection'}: pass DATA_DIR=" in err
    only_zip = tmp_path / "zip-only"
    only_zip.mkdir()
    (only_zip / "histopathologic-cancer-detection.zip").write_bytes(b"PK")
    assert main(["train", "--config", "configs/demo.yaml", "--fold", "0", "--data-dir", str(only_zip)]) == 2
    assert f"run `make data DATA_DIR={only_zip}` to unzip and verify it" in capsys.readouterr().err


def test_make_data_finds_every_bad_image_and_re_extracts_it_from_the_zip(fake_kaggle, demo_data, tmp_path, capsys):
    """A zero-byte file, a same-size file of garbage and a wrong-size patch: all named in one pass, all repaired."""
    import cv2

    fake_kaggle.data_zip = zip_of(demo_data)
    data_dir = Path(shutil.copytree(demo_data, tmp_path / "data"))
    victims = sorted((data_dir / "train").iterdir())[:2] + sorted((data_dir / "test").iterdir())[:1]
    victims[0].write_bytes(b"")
    victims[1].write_bytes(b"\xff" * victims[1].stat().st_size)      # same size: only decoding can tell
    cv2.imwrite(str(victims[2]), np.zeros((64, 64, 3), np.uint8))
    assert main(["data", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert f"3 of 368 images in {data_dir} cannot be used: " in out and "re-extracting them" in out
    assert f"train/{victims[0].name} (empty file, 0 bytes)" in out
    assert f"test/{victims[2].name} (64×64×3 uint8, not 96×96×3 uint8 RGB)" in out
    assert "unzipped 3 of 370 files" in out and "verified: 320 train / 48 test images, every one decodes" in out
    for victim in victims:
        assert victim.read_bytes() == (demo_data / victim.parent.name / victim.name).read_bytes()


def test_make_data_names_the_files_the_zip_cannot_repair(fake_kaggle, demo_data, tmp_path, capsys):
    broken = Path(shutil.copytree(demo_data, tmp_path / "broken"))
    victim = sorted((broken / "train").iterdir())[3]
    victim.write_bytes(b"")
    fake_kaggle.data_zip = zip_of(broken)                                # the zip holds the bad file itself
    data_dir = Path(shutil.copytree(broken, tmp_path / "data"))
    assert main(["data", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: 1 of 368 images in {data_dir} cannot be used: train/{victim.name} (empty file")
    assert "holds them this way too (it is kept)" in err and "replace those files by hand" in err
    assert (data_dir / "histopathologic-cancer-detection.zip").is_file()


def test_data_download_refused_by_rules(fake_kaggle, tmp_path, capsys):
    fake_kaggle.fail_status = 403
    assert main(["data", "--data-dir", str(tmp_path / "d")]) == 2
    assert "accept the competition rules" in capsys.readouterr().err


def test_data_without_credentials_says_where_to_put_them(no_kaggle_credentials, tmp_path, capsys):
    assert main(["data", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "~/.kaggle/kaggle.json" in err and "KAGGLE_USERNAME" in err and "KAGGLE_KEY" in err


@pytest.mark.parametrize("details, message", [
    ({"cv_auc": 0.9}, "demo-20261125-101500 | CV AUC 0.9000"),          # a sidecar without `experiment`
    ({"experiment": "mine"}, "mine (kit submission)"),
    ({}, "demo-20261125-101500 (kit submission)"),
])
def test_a_sidecar_holding_only_some_details_still_submits_with_a_message(fake_kaggle, predicted, details, message):
    sample = predicted.parent.parent / "data"
    predicted.with_suffix(".json").write_text(json.dumps(details))
    assert main(["submit", "--file", str(predicted), "--dry-run", "--data-dir", str(sample)]) == 0
    api.submit(predicted, data_dir=sample)
    assert fake_kaggle.submissions[-1]["submissionDescription"] == message


def test_a_damaged_sidecar_is_one_line(predicted, capsys):
    predicted.with_suffix(".json").write_text("{not json")
    assert main(["submit", "--file", str(predicted), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {predicted.with_suffix('.json')} is not readable JSON: delete it") and \
        "Traceback" not in err
