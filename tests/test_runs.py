"""The run-folder contract (kit/runs.py): config-checked resume and skip, a safe FORCE, the fold lock, splits bound
to their labels, predict from best.pt alone, EMA that validates a trained model, decay groups, OOF with TTA."""

import json
import socket

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from sklearn.metrics import roc_auc_score
from timm.utils import ModelEmaV3

import kit.engine as engine
from kit import api
from kit.checkpoints import load_checkpoint
from kit.config import load_config
from kit.ema import StepEma
from kit.errors import KitError
from kit.experiment import folds_to_train
from kit.fold import train_fold
from kit.inference import predict_tta_probabilities
from kit.models import build_model
from kit.recipe import build_optimizer
from kit.runs import (
    BEST,
    LAST,
    METRICS,
    OOF,
    RECORD,
    RUN_FILES,
    experiment_dir,
    fold_dir,
    fold_lock,
)

from conftest import REPO, lock_held_elsewhere

QUIET = {"log": lambda *_: None}


def snapshot(directory):
    """Every file of a fold folder, by content."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# ---- config-checked resume and skip -------------------------------------------------------------------------------

def test_a_changed_config_is_refused_naming_each_key_for_resume_skip_and_predict(quick_config):
    cfg = quick_config(epochs=1)
    train_fold(cfg, 0, **QUIET)
    before = snapshot(fold_dir(cfg, 0))

    with pytest.raises(KitError) as caught:
        train_fold(quick_config(epochs=1, **{"optimizer.lr": 3e-4}), 0, **QUIET)
    message = str(caught.value)
    assert "fold 0 of `demo` was trained with another config (optimizer.lr: 0.001 → 0.0003)" in message
    assert "FORCE=1" in message and "name=<new name>" in message

    with pytest.raises(KitError, match=r'model.name: "baseline_bn" → "resnet18"'):      # not a state_dict traceback
        train_fold(quick_config(epochs=1, **{"model.name": "resnet18"}), 0, **QUIET)
    with pytest.raises(KitError, match=r"optimizer.lr: 0.001 → 0.0003; seed: 42 → 7"):
        api.predict(quick_config(epochs=1, seed=7, **{"optimizer.lr": 3e-4}), allow_missing_folds=True, **QUIET)
    assert snapshot(fold_dir(cfg, 0)) == before, "a refusal touches nothing"

    messages = []                        # where and how fast a run goes does not change what it computes
    train_fold(quick_config(epochs=1, num_workers=0, eval_batch_size=64, device="cpu"), 0, log=messages.append)
    assert "already trained" in messages[0]


def test_an_interrupted_fold_does_not_resume_under_another_config(quick_config):
    def stop(epoch, row):
        raise KeyboardInterrupt

    cfg = quick_config(epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=stop, **QUIET)
    with pytest.raises(KitError, match=r"batch_size: 32 → 16"):
        train_fold(quick_config(epochs=2, batch_size=16), 0, **QUIET)
    assert load_checkpoint(fold_dir(cfg, 0) / LAST)["epoch"] == 1


def test_raising_epochs_continues_a_constant_schedule_and_is_refused_under_one_cycle(quick_config):
    cfg = quick_config(epochs=1)
    train_fold(cfg, 0, **QUIET)
    messages = []
    metrics = train_fold(quick_config(epochs=2), 0, log=messages.append)
    assert "resuming after epoch 1" in messages[0] and "epochs raised 1 → 2" in messages[0]
    assert metrics["epochs_trained"] == 2
    out = fold_dir(cfg, 0)
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]
    assert json.loads((out / RECORD).read_text())["extended"][0]["epochs"] == [1, 2]
    assert "epochs: 2" in (out / "config.yaml").read_text()

    onecycle = quick_config(epochs=1, **{"schedule.name": "onecycle", "name": "onecycle"})
    train_fold(onecycle, 0, **QUIET)
    with pytest.raises(KitError, match=r"epochs: 1 → 2\) \(a one-cycle schedule cannot continue past its end\)"):
        train_fold(quick_config(epochs=2, **{"schedule.name": "onecycle", "name": "onecycle"}), 0, **QUIET)


def test_a_copied_config_gets_its_own_run_folder(tmp_path):
    assert not any(line.startswith("name:") for path in (REPO / "configs").glob("*.yaml")
                   for line in path.read_text().splitlines()), "shipped configs take their name from the file"
    copy = tmp_path / "demo_lr3e-4.yaml"
    copy.write_text((REPO / "configs" / "demo.yaml").read_text().replace("lr: 1.0e-3", "lr: 3.0e-4"))
    cfg = load_config(copy)
    assert cfg.name == "demo_lr3e-4" and cfg.optimizer.lr == 3e-4
    assert fold_dir(cfg, 0) != fold_dir(load_config("demo"), 0)


# ---- a safe FORCE ----------------------------------------------------------------------------------------------------

def test_force_checks_everything_first_and_keeps_the_old_fold_until_the_new_one_has_a_checkpoint(
        quick_config, monkeypatch, tmp_path):
    cfg = quick_config(epochs=1)
    train_fold(cfg, 0, **QUIET)
    out = fold_dir(cfg, 0)
    before = snapshot(out)
    assert set(before) == set(RUN_FILES)

    for bad, message in (({"data_dir": str(tmp_path / "typo")}, "data folder not found"),
                         ({"model.name": "resnet_18"}, "unknown model")):
        with pytest.raises(KitError, match=message):
            train_fold(quick_config(epochs=1, **bad), 0, force=True, **QUIET)
        assert snapshot(out) == before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt           # Ctrl-C in the first epoch of the retrain

    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_fold(cfg, 0, force=True, **QUIET)
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["fold0", "fold0.lock"], "no half-built folder left"

    seen = []

    def check_swap(epoch, row):          # after the first checkpoint of the retrain, fold0/ is the new run
        seen.append(load_checkpoint(out / LAST)["epoch"])
        assert not (out / METRICS).exists()

    train_fold(quick_config(epochs=1, **{"optimizer.lr": 3e-4}), 0, force=True, on_epoch_end=check_swap, **QUIET)
    assert seen == [1]
    after = snapshot(out)
    assert after[BEST] != before[BEST] and "lr: 0.0003" in after["config.yaml"].decode()


# ---- the lock ------------------------------------------------------------------------------------------------------

def test_a_second_process_on_a_fold_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(quick_config):
    cfg = quick_config(epochs=1)
    with lock_held_elsewhere(experiment_dir(cfg) / "fold0.lock") as holder:      # killed with -9 at the end
        with pytest.raises(KitError) as caught:
            train_fold(cfg, 0, **QUIET)
        assert f"fold 0 of `demo` is being trained by PID {holder.pid} on {socket.gethostname()}" in str(caught.value)
        assert not fold_dir(cfg, 0).exists(), "the refused process wrote nothing"
    with fold_lock(cfg, 0):                         # the OS released the dead holder's lock
        pass


# ---- the split bound to its labels ----------------------------------------------------------------------------------

def test_changed_labels_refuse_train_and_predict_until_retrained(quick_config, data_copy):
    cfg = quick_config(epochs=1, data_dir=str(data_copy), max_train_images=64, **{"tta.views": "none"})
    api.train_all(cfg, **QUIET)
    record = json.loads((fold_dir(cfg, 0) / RECORD).read_text())
    assert (fold_dir(cfg, 0).parent.parent / "folds" / record["split"]["file"]).is_file()

    labels = pd.read_csv(data_copy / "train_labels.csv", dtype={"id": str})
    labels.loc[0, "label"] = 1 - labels.loc[0, "label"]
    labels.to_csv(data_copy / "train_labels.csv", index=False)
    changed = r"train_labels.csv changed since fold 0, 1 of `demo` was split \(1 label\(s\) changed\)"
    with pytest.raises(KitError, match=changed):
        train_fold(cfg, 1, **QUIET)
    with pytest.raises(KitError, match=changed + ".*make train-all FORCE=1"):
        api.predict(cfg, **QUIET)
    with pytest.raises(KitError, match=changed):
        api.report(cfg)

    api.train_all(cfg, force=True, **QUIET)           # the way out: every fold retrained on today's split
    assert api.predict(cfg, **QUIET).is_file()


# ---- predict from best.pt alone -------------------------------------------------------------------------------------

def test_predict_needs_no_pretrained_file(quick_config, tmp_path):
    weights = tmp_path / "resnet18-imagenet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    cfg = quick_config(epochs=1, max_train_images=32, batch_size=16, **{
        "model.name": "resnet18", "model.pretrained_file": str(weights), "tta.views": "none"})
    api.train_all(cfg, **QUIET)
    weights.unlink()                                  # another machine: the file is not there
    path = api.predict(cfg, **QUIET)
    submission = pd.read_csv(path, dtype={"id": str})
    assert submission["label"].between(0, 1).all() and submission["label"].nunique() > 1


# ---- EMA -------------------------------------------------------------------------------------------------------------

def test_ema_warms_up_with_the_step_so_one_epoch_validates_a_trained_model(quick_config):
    cfg = quick_config(epochs=1, **{"train.ema_decay": 0.999})
    torch.manual_seed(cfg.seed * 1000)
    initial = build_model(cfg.model).state_dict()
    train_fold(cfg, 0, **QUIET)
    out = fold_dir(cfg, 0)
    best, raw = load_checkpoint(out / BEST)["model"], load_checkpoint(out / LAST)["model"]
    weights = [name for name, _ in build_model(cfg.model).named_parameters()]      # weights, not BN statistics

    def distance(a, b):
        return float(sum(((a[n] - b[n]) ** 2).sum() for n in weights).sqrt())

    assert distance(best, raw) > 0, "best.pt holds the EMA weights, not the raw ones"
    # a fixed 0.999 over 9 steps would leave 99% of the initial weights; the warm-up follows the training instead
    assert distance(best, raw) < 0.5 * distance(best, initial)


def test_step_ema_equals_timms_update():
    torch.manual_seed(0)
    model = build_model(load_config("effnet_b0", ["model.pretrained=false"]).model)
    reference, fast = ModelEmaV3(model, decay=0.99, use_warmup=True), StepEma(model, 0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        model.train()
        model(torch.rand(4, 3, 96, 96)).sum().backward()
        optimizer.step()
        reference.update(model, step=step)
        fast.update(model, step=step)
    for (name, expected), actual in zip(reference.module.state_dict().items(), fast.module.state_dict().values()):
        torch.testing.assert_close(actual, expected, msg=name)
    assert fast.get_decay(2) < 0.5 < fast.get_decay(100) < 0.99 == fast.get_decay(10**6)


# ---- weight decay ---------------------------------------------------------------------------------------------------

def test_no_weight_decay_on_norm_weights_and_biases():
    cfg = load_config("convnext_nano", ["model.pretrained=false"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    for group in optimizer.param_groups:
        decays = not group["name"].endswith("no_decay")
        assert group["weight_decay"] == (cfg.optimizer.weight_decay if decays else 0.0)
        for parameter in group["params"]:
            assert (parameter.ndim > 1) == decays, names[id(parameter)]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert any("norm" in names[id(p)] for p in groups["backbone_no_decay"]["params"])


# ---- OOF with the submission's TTA ----------------------------------------------------------------------------------

def test_oof_is_best_pt_with_the_configured_tta_views(quick_config, demo_data):
    cfg = quick_config(epochs=2)
    metrics = train_fold(cfg, 0, **QUIET)
    out = fold_dir(cfg, 0)
    oof = pd.read_csv(out / OOF, dtype={"id": str})
    state = load_checkpoint(out / BEST)
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    from kit.data import cache_dir_for, load_split_images, read_train_labels

    labels = read_train_labels(demo_data)
    images = load_split_images(demo_data, "train", labels["id"], cache_dir_for(cfg, demo_data))
    rows = labels.index[labels["id"].isin(oof["id"])].to_numpy()
    assert cfg.tta.views == "hflip"
    expected = predict_tta_probabilities(model, images, "hflip", 128, torch.device("cpu"), rows=rows)
    np.testing.assert_allclose(oof["pred"].to_numpy(), expected, rtol=1e-4, atol=1e-5)
    untta = predict_tta_probabilities(model, images, "none", 128, torch.device("cpu"), rows=rows)
    assert not np.allclose(untta, expected, atol=1e-4), "the views must differ for the test to mean much"

    history = pd.read_csv(out / "history.csv")
    assert metrics["best_val_auc"] == pytest.approx(history["val_auc"].max())          # per epoch, view-free
    assert metrics["oof_auc"] == pytest.approx(roc_auc_score(oof["label"], oof["pred"]))
    assert metrics["tta"] == "hflip" and metrics["tta_views"] == 2


# ---- nothing lost: a finished fold is never deleted or retrained without FORCE ---------------------------------------

def test_a_finished_fold_without_last_pt_is_kept_skipped_and_never_extended(quick_config):
    cfg = quick_config(epochs=1)
    train_fold(cfg, 0, **QUIET)
    folder = fold_dir(cfg, 0)
    (folder / LAST).unlink()                      # as a fold brought back from Kaggle has no resume state
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)

    messages = []
    train_fold(cfg, 0, log=messages.append)
    assert "already trained" in messages[0]
    assert folds_to_train(cfg) == [1], "train-all (sequential and parallel) skips it too"
    with pytest.raises(KitError, match=r"fold 0 of `demo` finished 1 epochs but has no last.pt .* to continue to "
                                       r"2: it is kept as it is; use it with epochs=1, or retrain it with FORCE=1"):
        train_fold(quick_config(epochs=2), 0, **QUIET)
    (folder / BEST).rename(folder / "best.pt.moved")
    with pytest.raises(KitError, match=r"fold 0 of `demo` finished but lacks best.pt .*restore the file\(s\), or "
                                       r"retrain it with FORCE=1"):
        train_fold(cfg, 0, **QUIET)
    (folder / "best.pt.moved").rename(folder / BEST)
    assert snapshot(folder) == before, "nothing of the fold was touched"

    train_fold(cfg, 0, force=True, **QUIET)       # FORCE=1 replaces it (staged, swapped at the first checkpoint)
    assert (folder / LAST).is_file() and not (folder / "notes.txt").exists()


def test_a_fresh_start_deletes_only_what_an_unfinished_first_epoch_leaves(quick_config):
    cfg = quick_config(epochs=1)
    folder = fold_dir(cfg, 0)
    folder.mkdir(parents=True)
    (folder / "important.txt").write_text("keep me")
    with pytest.raises(KitError, match=r"holds important.txt, which no unfinished run of the kit leaves: nothing "
                                       r"was deleted; move them elsewhere, or pass FORCE=1"):
        train_fold(cfg, 0, **QUIET)
    assert (folder / "important.txt").read_text() == "keep me"
    (folder / "important.txt").unlink()
    (folder / "history.csv").write_text("epoch\n")      # a first epoch killed before last.pt: cleared, trained
    assert train_fold(cfg, 0, **QUIET)["epochs_trained"] == 1


def test_folds_finished_for_fewer_epochs_than_the_config_says_are_predicted_and_reported(quick_config):
    quick = {"max_train_images": 64, "tta.views": "none"}
    api.train_all(quick_config(epochs=1, **quick), **QUIET)      # make train-all EPOCHS=1 …
    cfg = quick_config(epochs=3, **quick)                        # … with a config that says 3
    lines = []
    assert api.predict(cfg, log=lines.append).is_file()
    (note,) = [line for line in lines if line.startswith("note:")]
    assert note == ("note: `demo` uses its finished folds as trained, not for the config's 3 epochs (folds 0, 1 "
                    "for 1); `make train-all` would extend the shorter ones to 3 epochs")
    report = api.report(cfg).read_text()
    assert "not for the config's 3 epochs" in report
    assert "resuming after epoch 1" in "".join(capture(lambda log: train_fold(cfg, 0, log=log))), "the advice works"


def capture(work) -> list[str]:
    lines = []
    work(lines.append)
    return lines


# ---- names and links stay inside their folders ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "a/b", "..", ".hidden", "with space"])
def test_an_experiment_name_is_one_folder_name(quick_config, tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    with pytest.raises(KitError, match=r"experiment name .* must be one folder name \(letters, digits"):
        quick_config(name=name)
    assert (victim / "precious.txt").read_text() == "keep"


def test_a_config_file_stem_is_checked_like_a_name_and_paths_cannot_leave_their_folder(tmp_path):
    from kit.io import path_inside
    from kit.submission import submission_path

    odd = tmp_path / "my exp.yaml"
    odd.write_text("epochs: 1\n")
    with pytest.raises(KitError, match=r"experiment name 'my exp' must be one folder name .*e.g. name=my_exp"):
        load_config(odd)
    assert load_config(odd, {"name": "my_exp"}).name == "my_exp"
    for escaping in ("../x", "/etc/x", "."):
        with pytest.raises(KitError, match="would lead outside"):
            path_inside(tmp_path / "runs", escaping)
    with pytest.raises(KitError, match="would lead outside"):
        submission_path(tmp_path / "submissions", "../elsewhere")


def test_a_fold_lock_that_is_a_symbolic_link_is_not_followed(quick_config, tmp_path):
    cfg = quick_config(epochs=1)
    target = tmp_path / "precious.txt"
    target.write_text("keep")
    experiment_dir(cfg).mkdir(parents=True)
    (experiment_dir(cfg) / "fold0.lock").symlink_to(target)
    with pytest.raises(KitError, match=r"fold0.lock is a symbolic link, not a lock file: the kit does not follow "
                                       r"it; remove the link and rerun"):
        train_fold(cfg, 0, **QUIET)
    assert target.read_text() == "keep"
