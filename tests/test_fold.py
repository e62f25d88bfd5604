"""The fold lifecycle (kit/fold.py) with both training methods, and the checkpoints it writes (kit/checkpoints.py):
an interrupted run of the real recipe shape resumes bit for bit, a frozen-features fold never resumes onto other
features, the best epoch's tie rule, and checkpoints of another kind or a newer version refused in one line."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kit.checkpoints import (
    CHECKPOINT_VERSION,
    FoldProgress,
    load_checkpoint,
    model_from_best,
    read_checkpoint,
)
from kit.config import load_config
from kit.errors import KitError
from kit.fold import train_fold
from kit.runs import BEST, LAST, fold_dir
from kit.weights import LITE0_TIMM_NAME

QUIET = {"log": lambda *_: None}
TIMING_COLUMNS = ("images_per_s", "seconds", "peak_memory_mb")


def stop_after(epoch_to_stop: int):
    def on_epoch_end(epoch, row):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt           # what Ctrl-C does mid-run
    return on_epoch_end


def assert_same_state(first, second, where: str = "") -> None:
    """Two checkpoint values equal bit for bit: tensors exactly, containers entry by entry."""
    if isinstance(first, torch.Tensor):
        assert isinstance(second, torch.Tensor) and first.dtype == second.dtype, where
        assert torch.equal(first, second), f"{where} differs"
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_same_state(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            assert_same_state(a, b, f"{where}[{index}]")
    else:
        assert first == second, f"{where}: {first!r} != {second!r}"


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]


# ----------------------------------------------------------------------------------------------------------------
# Resume, bit for bit, with warm-up, cosine, EMA and early stopping
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_interrupted_fold_of_the_real_recipe_resumes_to_the_same_checkpoints_bit_for_bit(quick_config, tmp_path):
    recipe = {"epochs": 2, "schedule.name": "cosine", "schedule.warmup_epochs": 0.5, "schedule.min_lr": 1e-5,
              "train.ema_decay": 0.9, "train.early_stopping": 3, "optimizer.name": "adamw",
              "optimizer.weight_decay": 0.01, "max_train_images": 64, "tta.views": "none"}
    cfg = quick_config(**recipe)
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=stop_after(1), **QUIET)
    out = fold_dir(cfg, 0)
    state = load_checkpoint(out / LAST)
    assert state["epoch"] == 1 and not (out / "metrics.json").exists()
    # a GPU run's dropout draws from the CUDA generator, whose state no checkpoint holds: the resume must not need
    # the saved generator state, because every epoch seeds every generator from the run seed and the epoch
    state["torch_rng"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(state, out / LAST)
    messages = []
    train_fold(cfg, 0, log=messages.append)
    assert any("resuming after epoch 1" in m for m in messages)

    straight = quick_config(**recipe, out_dir=str(tmp_path / "straight"))
    train_fold(straight, 0, **QUIET)
    for name in (LAST, BEST):
        resumed, uninterrupted = load_checkpoint(out / name), load_checkpoint(fold_dir(straight, 0) / name)
        for key in ("model", "optimizer", "scheduler", "ema", "swa", "epoch", "best_auc", "best_epoch", "val_auc"):
            if key in uninterrupted:
                assert_same_state(resumed[key], uninterrupted[key], f"{name}:{key}")
        if name == LAST:
            assert without_timings(resumed["history"]) == without_timings(uninterrupted["history"])
    assert pd.read_csv(out / "oof.csv")["pred"].equals(pd.read_csv(fold_dir(straight, 0) / "oof.csv")["pred"])


# ----------------------------------------------------------------------------------------------------------------
# The best epoch
# ----------------------------------------------------------------------------------------------------------------

def test_the_best_epoch_is_the_higher_auc_then_the_lower_loss():
    progress = FoldProgress(history=[{"val_auc": 1.0, "val_loss": 0.50}], best_auc=1.0, best_epoch=1)
    assert progress.is_better({"val_auc": 1.0, "val_loss": 0.15}), "same AUC, more confident: better"
    assert not progress.is_better({"val_auc": 1.0, "val_loss": 0.50}), "the same on both: no improvement"
    assert not progress.is_better({"val_auc": 1.0, "val_loss": 0.51})
    assert not progress.is_better({"val_auc": 0.99, "val_loss": 0.01}), "AUC first"
    assert FoldProgress().is_better({"val_auc": 0.5, "val_loss": 9.0}), "the first epoch is the best so far"


@pytest.mark.slow
def test_a_fold_whose_auc_ties_keeps_the_epoch_with_the_lower_validation_loss(quick_config):
    cfg = quick_config(epochs=3, **{"tta.views": "none"})
    metrics = train_fold(cfg, 0, **QUIET)
    history = pd.read_csv(fold_dir(cfg, 0) / "history.csv")
    best = history[history["val_auc"] == history["val_auc"].max()].sort_values(["val_loss", "epoch"])
    assert metrics["best_epoch"] == int(best["epoch"].iloc[0])
    assert load_checkpoint(fold_dir(cfg, 0) / BEST)["epoch"] == metrics["best_epoch"]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint kinds and versions
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_fold(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = load_config("demo", {"data_dir": str(demo_data), "out_dir": str(out / "runs"), "epochs": 1,
                               "folds.n_splits": 2, "max_train_images": 32, "tta.views": "none"})
    train_fold(cfg, 0, **QUIET)
    return cfg


def test_every_checkpoint_says_its_kind_method_and_version(trained_fold):
    out = fold_dir(trained_fold, 0)
    last, best = load_checkpoint(out / LAST), load_checkpoint(out / BEST)
    assert (last["kind"], last["version"], last["method"]) == ("last", CHECKPOINT_VERSION, "fine-tune")
    assert (best["kind"], best["version"]) == ("best", CHECKPOINT_VERSION)


def test_a_checkpoint_of_another_kind_or_a_newer_version_is_refused_in_one_line(trained_fold, tmp_path):
    out = fold_dir(trained_fold, 0)
    best = load_checkpoint(out / BEST)
    torch.save(load_checkpoint(out / LAST), tmp_path / BEST)              # last.pt copied over best.pt
    with pytest.raises(KitError, match="is a `last` checkpoint, not `best`"):
        model_from_best(tmp_path / BEST)
    torch.save({**best, "version": CHECKPOINT_VERSION + 1}, tmp_path / BEST)
    with pytest.raises(KitError, match=r"written by a newer kit .*update the kit"):
        model_from_best(tmp_path / BEST)
    torch.save({**load_checkpoint(out / LAST), "method": "distillation"}, tmp_path / LAST)
    with pytest.raises(KitError, match="unknown training method 'distillation'"):
        read_checkpoint(tmp_path / LAST)
    torch.save(torch.zeros(3), tmp_path / BEST)
    with pytest.raises(KitError, match="not a kit checkpoint"):
        read_checkpoint(tmp_path / BEST)


def test_a_best_pt_from_before_kinds_existed_still_predicts(trained_fold, tmp_path):
    best = load_checkpoint(fold_dir(trained_fold, 0) / BEST)
    torch.save({k: v for k, v in best.items() if k not in ("kind", "version")}, tmp_path / BEST)
    model, saved = model_from_best(tmp_path / BEST)
    assert saved.name == trained_fold.name
    assert_same_state(model.state_dict(), best["model"])


def test_a_fine_tuned_last_pt_is_not_resumed_by_frozen_features(trained_fold):
    from kit.checkpoints import read_resume
    from kit.runs import FoldRun

    with pytest.raises(KitError, match=r"written by fine-tune, not frozen-features .*FORCE=1"):
        read_resume(FoldRun(trained_fold, 0), "frozen-features")


# ----------------------------------------------------------------------------------------------------------------
# Frozen features: the head never resumes onto other features
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_frozen_features_fold_refuses_to_resume_after_the_backbone_weights_changed(lite0_weights, demo_data,
                                                                                     tmp_path):
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(lite0_weights.read_bytes())
    cfg = load_config("effnet_b0", {
        "model.name": LITE0_TIMM_NAME, "model.pretrained": False, "model.pretrained_file": str(weights),
        "data_dir": str(demo_data), "out_dir": str(tmp_path / "runs"), "train.frozen_features": True, "epochs": 3,
        "batch_size": 64, "folds.n_splits": 2, "tta.views": "none", "name": "frozen"})
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=stop_after(1), **QUIET)
    assert load_checkpoint(fold_dir(cfg, 0) / LAST)["feature_key"]
    messages = []
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=stop_after(2), log=messages.append)
    assert any("resuming after epoch 1" in m for m in messages), "the same weights resume"

    changed = torch.load(weights, weights_only=True)
    first = next(key for key, tensor in changed.items() if tensor.is_floating_point())
    changed[first] = changed[first] + 0.01
    torch.save(changed, weights)                       # another weights file at the same path
    history = (fold_dir(cfg, 0) / "history.csv").read_bytes()
    with pytest.raises(KitError, match=r"its head was trained on other features .*retrain it with FORCE=1"):
        train_fold(cfg, 0, **QUIET)
    assert (fold_dir(cfg, 0) / "history.csv").read_bytes() == history, "nothing of the old run was mixed in"


def test_a_best_pt_copied_under_another_name_still_predicts(trained_fold, tmp_path):
    best = load_checkpoint(fold_dir(trained_fold, 0) / BEST)
    torch.save(best, tmp_path / "fold0-weights.pt")
    model, _ = model_from_best(tmp_path / "fold0-weights.pt")
    assert_same_state(model.state_dict(), best["model"])
