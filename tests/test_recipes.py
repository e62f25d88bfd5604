"""Transfer learning and the training recipe: shipped configs, pretrained files, augmentation, options, blending."""

import dataclasses
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
from sklearn.metrics import roc_auc_score

from kit.augment import build_transform, worst_centre_overlap
from kit.checkpoints import load_checkpoint
from kit.cli import main
from kit.config import ModelConfig, histology_augmentation, load_config
from kit.errors import KitError
from kit.fold import train_fold
from kit.hub import is_hub_name
from kit.models import BASELINES, build_model, head_parameter_names
from kit.predict import blend, choose_blend_weights, weight_grid
from kit.runs import fold_dir

from conftest import REPO

# hub models (hf-hub:…) need the network and a GPU's memory: tests/test_hub_models.py runs a tiny one in their place
SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if not is_hub_name(load_config(p).model.name))
QUIET = {"log": lambda *_: None}


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_builds_its_model_and_trains_a_few_steps(name, demo_data, tmp_path):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", {
        "model.pretrained": False, "data_dir": str(demo_data), "out_dir": str(tmp_path), "epochs": 1,
        "max_train_images": 16, "batch_size": 8, "eval_batch_size": 64, "folds.n_splits": 10})   # 32 held out
    torch.manual_seed(cfg.seed * 1000 + 0)                      # fold 0's initial weights
    initial = build_model(cfg.model)
    metrics = train_fold(cfg, 0, **QUIET)
    assert metrics["epochs_trained"] == 1 and metrics["valid_images"] == 32
    # its two steps moved what its recipe trains in epoch 1: the head alone under a frozen-backbone warm-up, else the
    # head and the backbone (2 steps learn nothing measurable: the AUC after them is chance, 0.37–0.77 measured).
    # Of a trained backbone all but a tensor whose step rounds away in float32 moves (convnext_nano: 1 of 144, a norm
    # whose gradient, behind a 1e-6 layer scale, is far below Adam's eps: a step of ~1e-8 on a weight of 1.0).
    last = load_checkpoint(fold_dir(cfg, 0) / "last.pt")
    moved = {key for key, value in initial.named_parameters() if not torch.equal(last["model"][key], value.detach())}
    head = head_parameter_names(initial)
    backbone = {key for key, _ in initial.named_parameters()} - head
    assert head <= moved, f"the head did not learn: {sorted(head - moved)}"
    if cfg.train.freeze_backbone_epochs:
        assert not moved & backbone, f"moved while frozen: {sorted(moved & backbone)[:3]}"
    else:
        assert len(moved & backbone) >= 0.95 * len(backbone), f"held: {sorted(backbone - moved)[:3]}"
    assert np.isfinite(last["history"][0]["train_loss"])
    model = build_model(cfg.model)
    assert model(torch.rand(2, 3, 96, 96)).shape == (2,)
    if cfg.model.name not in BASELINES:   # normalisation from the model's own pretrained data config, RGB order
        expected = timm.data.resolve_data_config({}, model=timm.create_model(cfg.model.name, pretrained=False))
        torch.testing.assert_close(model.mean.flatten(), torch.tensor(expected["mean"]))
        torch.testing.assert_close(model.std.flatten(), torch.tensor(expected["std"]))


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_pretrained_file_loads_every_backbone_tensor_and_a_fresh_head(tmp_path, suffix):
    source = timm.create_model("resnet18", pretrained=False)          # 1000-class head, as downloaded weights are
    path = tmp_path / f"resnet18.{suffix}"
    if suffix == "pth":
        torch.save(source.state_dict(), path)
    else:
        safetensors.torch.save_file(source.state_dict(), str(path))
    cfg = load_config(REPO / "configs" / "resnet34.yaml", {"model.name": "resnet18", "model.pretrained_file": str(path)})
    loaded = build_model(cfg.model).net.state_dict()
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert backbone and all(torch.equal(loaded[k], v) for k, v in backbone.items())
    assert loaded["fc.weight"].shape == (1, 512)


def test_weights_of_another_architecture_are_refused_naming_the_keys(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(KitError) as caught:
        build_model(ModelConfig(name="resnet34", pretrained_file=str(tmp_path / "r18.pth")))
    assert "does not fit `resnet34`" in str(caught.value) and "missing: layer1.2.conv1.weight" in str(caught.value)


def test_unknown_timm_name_lists_close_matches():
    with pytest.raises(KitError, match="unknown model `efficientnet_b00`.*close matches: efficientnet_b0"):
        build_model(ModelConfig(name="efficientnet_b00"))


def test_no_network_and_no_file_suggests_pretrained_file(tmp_path):
    code = "from kit.models import build_model; from kit.config import ModelConfig; " \
           "build_model(ModelConfig(name='efficientnet_b0', pretrained=True))"
    result = subprocess.run([sys.executable, "-c", f"from kit.cli import main; import sys; "
                             f"sys.argv=['x']; from kit.errors import KitError\ntry:\n {code}\nexcept KitError as e:\n"
                             f" print('error:', e); sys.exit(2)"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot load pretrained weights for `efficientnet_b0`" in result.stdout
    assert "model.pretrained_file" in result.stdout


# ---- augmentation -------------------------------------------------------------------------------------------------

def test_geometric_augmentation_keeps_the_centre_in_the_centre():
    d4 = [{"name": n, "p": 0.5} for n in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose")]
    assert worst_centre_overlap(build_transform(d4, "augment.train")) == 1.0      # D4 maps the centre onto itself
    assert worst_centre_overlap(build_transform(histology_augmentation(), "augment.train")) >= 2 / 3
    for name in SHIPPED:
        cfg = load_config(name)
        for key in ("train", "valid"):
            transform = build_transform(getattr(cfg.augment, key), f"augment.{key}")   # would raise if it drifted
            assert transform is None or worst_centre_overlap(transform) >= 2 / 3
    shifting = [{"name": "Affine", "translate_percent": [0.25, 0.3], "p": 1.0}]
    with pytest.raises(KitError, match="`augment.train` moves the centre 32×32"):
        build_transform(shifting, "augment.train")


@pytest.mark.parametrize("spec, message", [
    ({"name": "HorizontalFlp"}, "`HorizontalFlp` is not an albumentations transform"),
    ({"name": "HorizontalFlip", "probability": 0.5}, "bad parameters"),
    ({"name": "RandomRotate90", "angle": 3}, "bad parameters"),
    ("HorizontalFlip", "must be a mapping with a `name`"),
])
def test_bad_transforms_are_named(spec, message):
    with pytest.raises(KitError, match=message) as caught:
        build_transform([spec], "augment.train")
    assert "augment.train[0]" in str(caught.value)


# ---- recipe options -----------------------------------------------------------------------------------------------


def test_a_frozen_backbone_trains_only_the_head(quick_config):
    cfg = quick_config(**{"epochs": 2, "train.freeze_backbone_epochs": 5, "max_train_images": 64})
    torch.manual_seed(cfg.seed * 1000 + 0)
    initial = build_model(cfg.model).state_dict()
    train_fold(cfg, 0, **QUIET)
    last = load_checkpoint(fold_dir(cfg, 0) / "last.pt")["model"]
    model = build_model(cfg.model)
    head = head_parameter_names(model)
    for name, _ in model.named_parameters():     # weights; BatchNorm statistics still follow the data
        if name not in head:
            assert torch.equal(last[name], initial[name]), f"{name} moved while the backbone was frozen"
    assert head and all(not torch.equal(last[name], initial[name]) for name in head), "the head must learn"


def test_early_stopping_ends_a_run_that_stops_improving(quick_config):
    # lr 1e-12: the weights cannot change, so no epoch beats the first; patience 1 stops after epoch 2
    cfg = quick_config(**{"epochs": 4, "train.early_stopping": 1, "optimizer.lr": 1e-12, "max_train_images": 64})
    metrics = train_fold(cfg, 0, **QUIET)
    assert metrics["stopped_early"] and metrics["epochs_trained"] == 2 and metrics["best_epoch"] == 1
    messages = []
    train_fold(cfg, 0, log=messages.append)          # a fold that stopped early counts as finished
    assert "already trained" in messages[0]


# ---- blending -------------------------------------------------------------------------------------------------------

def test_blend_weights_and_values_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.4).astype(int)
    a = np.clip(labels * 0.3 + rng.random(400) * 0.7, 0, 1)          # two noisy, partly complementary members
    b = np.clip(labels * 0.25 + rng.random(400) * 0.75, 0, 1) ** 3
    for method in ("mean", "rank"):
        weights, auc = choose_blend_weights([a, b], labels, method)
        members = [a, b] if method == "mean" else [pd.Series(x).rank(pct=True).to_numpy() for x in (a, b)]
        by_hand = max(((roc_auc_score(labels, w * members[0] + (1 - w) * members[1]), -i, w)
                       for i, w in enumerate(np.arange(20, -1, -1) / 20)))
        assert auc == pytest.approx(by_hand[0]) and weights[0] == pytest.approx(by_hand[2])
        assert auc >= max(roc_auc_score(labels, a), roc_auc_score(labels, b))
        np.testing.assert_allclose(blend([a, b], weights, method), weights[0] * members[0] + weights[1] * members[1])
    assert len(weight_grid(3)) == 231 and np.allclose(weight_grid(3).sum(axis=1), 1)


def test_predict_blends_two_experiments(quick_config, demo_data, tmp_path, capsys):
    common = ["--data-dir", str(demo_data), "--out", str(tmp_path / "runs"), "epochs=1", "folds.n_splits=2",
              "max_train_images=96", "tta.views=none", f"submissions_dir={tmp_path / 'submissions'}"]
    demo = (REPO / "configs" / "demo.yaml").read_text()
    for name, seed in (("one", 1), ("two", 2)):      # two experiment configs, as a user would write them
        text = demo.replace("name: demo", f"name: {name}").replace("\nseed: 42\n", f"\nseed: {seed}\n")
        (tmp_path / f"{name}.yaml").write_text(text)
        assert main(["train-all", "--config", str(tmp_path / f"{name}.yaml"), *common]) == 0
    capsys.readouterr()
    exps = f"{tmp_path / 'one.yaml'} {tmp_path / 'two.yaml'}"
    assert main(["predict", "--exps", exps, "--blend", "rank", *common]) == 0
    out = capsys.readouterr().out
    assert "one: OOF AUC" in out and "two: OOF AUC" in out and "blend (rank) of one + two: OOF AUC" in out
    path = out.strip().splitlines()[-1]
    assert "blend-one+two-" in path
    submission = pd.read_csv(path, dtype={"id": str})
    sample = pd.read_csv(demo_data / "sample_submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist() and submission["label"].between(0, 1).all()


# ---- recipe options of the best public solutions ---------------------------------------------------------------------


def test_input_size_resizes_on_the_device_and_global_pool_reaches_timm():
    model = build_model(ModelConfig(name="resnet18", input_size=128, global_pool="catavgmax")).eval()
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    assert model(torch.rand(2, 3, 96, 96)).shape == (2,) and seen == [(2, 3, 128, 128)]
    assert model.net.get_classifier().in_features == 2 * 512          # concatenated average and max pooling
    with pytest.raises(KitError, match="model.input_size and model.global_pool are for timm models"):
        build_model(ModelConfig(name="baseline_bn", input_size=224))


def test_swa_averages_the_last_epochs_recomputes_batchnorm_and_resumes_exactly(quick_config, tmp_path):
    cfg = quick_config(epochs=3, **{"train.swa_epochs": 2})

    def stop_in_the_window(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 0, on_epoch_end=stop_in_the_window, **QUIET)
    metrics = train_fold(cfg, 0, **QUIET)
    best = load_checkpoint(fold_dir(cfg, 0) / "best.pt")
    last = load_checkpoint(fold_dir(cfg, 0) / "last.pt")
    assert best["swa_epochs"] == 2 and metrics["swa_val_auc"] == pytest.approx(best["val_auc"])
    averaged = {k[len("module."):]: v for k, v in last["swa"].items() if k.startswith("module.")}
    weights = [n for n, _ in build_model(cfg.model).named_parameters()]
    assert all(torch.equal(best["model"][n], averaged[n]) for n in weights), "best.pt holds the SWA average"
    assert not all(torch.equal(best["model"][n], last["model"][n]) for n in weights)
    stats = [n for n in best["model"] if n.endswith("running_mean")]
    assert stats and not all(torch.equal(best["model"][n], averaged[n]) for n in stats), "BatchNorm recomputed"

    straight = quick_config(epochs=3, out_dir=str(tmp_path / "straight"), **{"train.swa_epochs": 2})
    train_fold(straight, 0, **QUIET)
    straight_best = load_checkpoint(fold_dir(straight, 0) / "best.pt")["model"]
    for name, tensor in straight_best.items():
        torch.testing.assert_close(best["model"][name], tensor, msg=name)


COMPETE = ["compete_effnet_b0", "compete_resnet34", "compete_convnext_nano"]


def test_the_competitive_recipe_is_what_the_readme_says():
    """224 px ImageNet backbones, a frozen-backbone warm-up epoch, cosine, SWA over the last 3 epochs (no early
    stopping to cut it short), 4 flip views: and the three are blendable (same folds, same data)."""
    configs = [load_config(name) for name in COMPETE]
    for cfg in configs:
        assert cfg.model.pretrained and cfg.model.input_size == 224 and cfg.model.name not in BASELINES
        assert cfg.train.freeze_backbone_epochs == 1 and cfg.schedule.name == "cosine"
        assert cfg.train.swa_epochs == 3 < cfg.epochs and cfg.train.early_stopping == 0
        assert cfg.tta.views == "flip4"
        assert build_model(dataclasses.replace(cfg.model, pretrained=False)).input_size == 224
    assert len({(c.folds.n_splits, c.folds.seed, c.folds.groups_csv, c.data_dir) for c in configs}) == 1
    readme = (REPO / "README.md").read_text()
    assert f'make predict EXPS="{" ".join(COMPETE)}"' in readme
