"""Hub models (hf-hub:org/name) with their timm_kwargs, and the partial fine-tune a large ViT wants (trainable
blocks, layer-wise lr decay). No network anywhere: a tiny ViT stands in for a pathology foundation model, written as
a Hugging Face cache entry and as a folder of its files inside tmp_path, with HF_HUB_OFFLINE=1."""

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.optim import param_groups_layer_decay

from kit.backbones import resolved_timm_kwargs
from kit.config import ModelConfig, load_config
from kit.errors import KitError
from kit.fold import train_fold
from kit.models import build_model
from kit.predict import predict_test
from kit.recipe import build_training_parts, parameter_groups, set_backbone_trainable, train_step

from conftest import REPO, assert_the_best_epoch_is_kept

ARCHITECTURE = "vit_tiny_patch16_224"
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}   # 4×4 patches, 3 blocks
REPO_ID = "pathlab/tiny-vit"
HUB_NAME = f"hf-hub:{REPO_ID}"
MEAN, STD = [0.71, 0.58, 0.70], [0.21, 0.23, 0.18]        # a pathology model's stain statistics, not ImageNet's
REVISION = "0123456789abcdef0123456789abcdef01234567"
QUIET = {"log": lambda *_: None}


def tiny_vit(**extra) -> torch.nn.Module:
    """The stand-in's pretrained weights: no classifier (num_classes 0, as the foundation models ship), every
    tensor random so that loaded weights cannot pass for a fresh init."""
    net = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0, **TINY_VIT, **extra)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 0.05)
    return net


def write_model_files(folder, net) -> None:
    """config.json in timm's hub format (architecture, model_args, pretrained_cfg) and model.safetensors: what a
    hub repository of a timm model holds, and what `hf download … --local-dir` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    pretrained_cfg = {"input_size": [3, 32, 32], "fixed_input_size": True, "mean": MEAN, "std": STD,
                      "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0, "classifier": "head",
                      "first_conv": "patch_embed.proj", "license": "apache-2.0"}
    (folder / "config.json").write_text(json.dumps({"architecture": ARCHITECTURE, "num_classes": 0,
                                                    "num_features": 32, "model_args": TINY_VIT,
                                                    "pretrained_cfg": pretrained_cfg}))
    safetensors.torch.save_file(net.state_dict(), str(folder / "model.safetensors"))


def write_cache_entry(cache, net, files=("config.json", "model.safetensors")) -> None:
    """The layout huggingface_hub reads offline: models--org--name/refs/main → snapshots/<revision>/<files>."""
    entry = cache / f"models--{REPO_ID.replace('/', '--')}"
    write_model_files(entry / "snapshots" / REVISION, net)
    for name in {"config.json", "model.safetensors"} - set(files):
        (entry / "snapshots" / REVISION / name).unlink()
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REVISION)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache in tmp_path (huggingface_hub reads both when imported, so
    its constants are set as well as the environment)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for variable, value in (("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setenv(variable, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    return cache


def assert_backbone_is(model, net) -> None:
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in net.state_dict().items())
    assert loaded["head.weight"].shape == (1, 32)                      # a fresh 1-logit head in the classifier slot


# ---- hub models, their files, their mean/std and input size ---------------------------------------------------------

def test_a_hub_model_loads_offline_from_the_cache_with_its_own_mean_std_and_input_size(offline_cache):
    source = tiny_vit()
    write_cache_entry(offline_cache, source)
    model = build_model(ModelConfig(name=HUB_NAME, pretrained=True))
    assert_backbone_is(model, source)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(MEAN))      # the model's config, not ImageNet's
    torch.testing.assert_close(model.std.flatten(), torch.tensor(STD))
    # a ViT built without dynamic_img_size takes its own size only: model.input_size 0 means that size, said once
    assert model.input_size == 32 and "takes only 32×32 input" in model.notes[0]
    assert model(torch.rand(2, 3, 96, 96)).shape == (2,)
    overridden = build_model(ModelConfig(name=HUB_NAME, pretrained=True, mean=[0.5] * 3, std=[0.25] * 3))
    assert overridden.mean.flatten().tolist() == [0.5] * 3 and overridden.std.flatten().tolist() == [0.25] * 3
    with pytest.raises(KitError, match=r"`model.input_size: 64`: .* takes only 32×32 input; set model.input_size=32"):
        build_model(ModelConfig(name=HUB_NAME, input_size=64))
    dynamic = build_model(ModelConfig(name=HUB_NAME, timm_kwargs={"dynamic_img_size": True}))
    assert dynamic.input_size == 0 and dynamic(torch.rand(2, 3, 96, 96)).shape == (2,)   # 96 px as is, 12×12 patches


def test_the_same_hub_model_loads_from_a_folder_of_its_files_or_a_weights_file(offline_cache, tmp_path):
    source = tiny_vit()
    write_model_files(tmp_path / "kaggle-dataset", source)          # a Kaggle dataset of `hf download` output
    from_folder = build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(tmp_path / "kaggle-dataset")))
    assert_backbone_is(from_folder, source)                          # architecture and mean/std from its config.json
    torch.testing.assert_close(from_folder.mean.flatten(), torch.tensor(MEAN))
    # the architecture alone (what a best.pt is loaded into): the folder's config.json, no weights read
    skeleton = build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(tmp_path / "kaggle-dataset")),
                           initial_weights=False)
    assert skeleton.net.state_dict().keys() == from_folder.net.state_dict().keys()
    assert not torch.equal(skeleton.net.state_dict()["blocks.0.attn.qkv.weight"], source.blocks[0].attn.qkv.weight)

    lone = tmp_path / "weights" / "tiny.safetensors"                # the weights alone: the architecture comes from
    lone.parent.mkdir()                                              # the hub's config.json in the local cache
    safetensors.torch.save_file(source.state_dict(), str(lone))
    with pytest.raises(KitError, match="config.json .* is not in the local Hugging Face cache"):
        build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(lone)))
    write_cache_entry(offline_cache, tiny_vit(), files=("config.json",))
    assert_backbone_is(build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(lone))), source)


def test_a_hub_model_neither_cached_nor_reachable_is_one_line_naming_the_offline_routes(offline_cache):
    for model_cfg in (ModelConfig(name=HUB_NAME, pretrained=True), load_config("uni2_h").model):
        with pytest.raises(KitError) as caught:
            build_model(model_cfg)
        message = str(caught.value)
        assert "\n" not in message and f"`model.name: {model_cfg.name}`" in message
        assert str(offline_cache) in message and "HF_HUB_OFFLINE=1" in message
        assert "model.pretrained_file=/kaggle/input/" in message


INVALID_HUB_NAMES = ("hf-hub:../..", "hf-hub:no-organisation", "hf-hub:org/name/more", "hf-hub:-org/name",
                     "hf-hub:org/name.", "hf-hub:org--x/name", "hf-hub:org/na..me", "hf-hub:org/na me",
                     "hf-hub:org/café", "hf-hub:org/name.git", "hf-hub:org/" + "x" * 97, "hf-hub:org/name@../main",
                     "hf-hub:org/name@", "hf-hub:")


@pytest.mark.parametrize("name", INVALID_HUB_NAMES)
def test_an_invalid_hub_name_is_refused_as_such_in_one_line_before_the_hub_is_asked(name, offline_cache, tmp_path,
                                                                                      monkeypatch):
    import huggingface_hub

    def ask(*args, **kwargs):
        raise AssertionError("the hub (or its cache) was asked about an invalid name")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", ask)
    write_model_files(tmp_path / "files", tiny_vit())          # a folder of its files: the name is checked all the same
    for model_cfg in (ModelConfig(name=name, pretrained=True), ModelConfig(name=name, pretrained_file=str(tmp_path))):
        with pytest.raises(KitError) as caught:
            build_model(model_cfg)
        assert str(caught.value) == (
            f"config `model.name: {name}`: not a valid hub model name; expected hf-hub:org/name[@revision] (org and "
            f"name of letters, digits, _, - and ., neither starting nor ending with - or ., no -- or ..)")


def test_the_hub_name_rule_is_the_hubs_own():
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from kit.hub import hub_repo

    def hub_accepts(repo: str) -> bool:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            return False
        return True

    valid = ("MahmoodLab/UNI2-h", "bioptimus/H-optimus-0", "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "a/b",
             "org_1/x.y-z", "o/" + "x" * 96)
    for repo in valid + tuple(name[len("hf-hub:"):] for name in INVALID_HUB_NAMES if name.count("/") == 1):
        try:
            accepted = hub_repo(f"hf-hub:{repo}") == (repo, None)
        except KitError:
            accepted = False
        assert accepted == hub_accepts(repo) == (repo in valid), repo
    assert hub_repo("hf-hub:MahmoodLab/UNI2-h@refs/pr/1") == ("MahmoodLab/UNI2-h", "refs/pr/1")
    assert hub_repo(f"hf-hub:{REPO_ID}@{REVISION}") == (REPO_ID, REVISION)


def unfit_weights(net) -> dict:
    """`net`'s weights with three faults: block 2 missing, the MLPs half as wide, and a tensor of no model."""
    short = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=0, **{**TINY_VIT, "depth": 2, "mlp_ratio": 2})
    return {**short.state_dict(), "extra_token": torch.zeros(1, 1, 32)}


def test_hub_weights_that_do_not_fit_name_the_first_keys_of_each_kind_and_their_counts(offline_cache, tmp_path):
    source = tiny_vit()
    tensors, faults = source.state_dict(), unfit_weights(source)
    missing = [key for key in tensors if key.startswith("blocks.2.")]
    wrong_shape = [key for key in tensors if key in faults and faults[key].shape != tensors[key].shape]
    assert len(missing) == 12 and len(wrong_shape) == 6            # fc1 weight and bias, fc2 weight: blocks 0 and 1
    expected = (f"do not fit the model built (missing: {', '.join(missing[:4])} … (12 in all); unexpected: "
                f"extra_token; wrong shape: {', '.join(wrong_shape[:4])} … (6 in all)); use weights of this "
                f"architecture")
    # a folder of the model's files (a Kaggle dataset): torch said only "Error(s) in loading state_dict for …:"
    write_model_files(tmp_path / "files", source)
    safetensors.torch.save_file(faults, str(tmp_path / "files" / "model.safetensors"))
    with pytest.raises(KitError) as caught:
        build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(tmp_path / "files")))
    assert str(caught.value).startswith(f"config `model.pretrained_file`: {tmp_path / 'files' / 'model.safetensors'} "
                                        f"{expected}")
    # the same weights in the Hugging Face cache
    write_cache_entry(offline_cache, source)
    cached = offline_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / REVISION / "model.safetensors"
    safetensors.torch.save_file(faults, str(cached))
    with pytest.raises(KitError) as caught:
        build_model(ModelConfig(name=HUB_NAME, pretrained=True))
    message = str(caught.value)
    assert message.startswith(f"config `model.name: {HUB_NAME}`: its pretrained weights ({cached}) {expected}")
    # the architecture is checked before any weights are read: a bad timm_kwargs value is named, not the weights
    with pytest.raises(KitError, match=rf"^config `model.timm_kwargs.depth: abc`: `{HUB_NAME}` cannot be built with it "
                                       rf"\(TypeError: "):
        build_model(ModelConfig(name=HUB_NAME, pretrained=True, timm_kwargs={"depth": "abc"}))


def test_timm_kwargs_reach_timm_with_objects_from_timm_and_torch_only(offline_cache, tmp_path):
    # a hub model whose weights need an argument its config.json lacks (LayerScale: init_values, as H-optimus-0's)
    source = tiny_vit(init_values=1e-5)
    write_cache_entry(offline_cache, source)
    with pytest.raises(KitError, match=r"do not fit the model built \(unexpected: blocks.0.ls1.gamma.*timm_kwargs"):
        build_model(ModelConfig(name=HUB_NAME, pretrained=True))       # timm alone would load it half and go on
    cfg = load_config("demo", {"model.name": HUB_NAME, "model.pretrained": True,
                               "model.timm_kwargs": {"init_values": "1e-5"}})       # YAML reads 1e-5 as text
    assert cfg.model.timm_kwargs == {"init_values": 1e-5}
    assert_backbone_is(build_model(cfg.model), source)
    write_model_files(tmp_path / "files", source)                 # the same check on the offline route
    with pytest.raises(KitError, match=r"`model.pretrained_file`: .*model.safetensors do not fit the model built "
                                       r"\(unexpected: blocks.0.ls1.gamma"):
        build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(tmp_path / "files")))
    assert_backbone_is(build_model(ModelConfig(name=HUB_NAME, pretrained_file=str(tmp_path / "files"),
                                               timm_kwargs={"init_values": 1e-5})), source)

    uni2_like = {**TINY_VIT, "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    net = build_model(ModelConfig(name=ARCHITECTURE, timm_kwargs=uni2_like)).net
    assert type(net.blocks[0].mlp) is timm.layers.GluMlp and isinstance(net.blocks[0].mlp.act, torch.nn.SiLU)
    shipped = resolved_timm_kwargs(load_config("uni2_h").model.timm_kwargs)     # no network to check a config
    assert shipped["mlp_layer"] is timm.layers.SwiGLUPacked and shipped["act_layer"] is torch.nn.SiLU
    assert load_config("h_optimus_0").model.timm_kwargs == {"init_values": 1e-5, "dynamic_img_size": False}

    for value, message in (("os.system", "names an object outside timm. and torch."),
                           ("builtins.eval", "names an object outside timm. and torch.")):
        with pytest.raises(KitError, match=f"`model.timm_kwargs.act_layer`: '{value}' {message}"):
            load_config("demo", {"model.timm_kwargs": {"act_layer": value}})
    with pytest.raises(KitError, match="`model.timm_kwargs.num_classes`: set by the kit"):
        load_config("demo", ["model.timm_kwargs.num_classes=0"])
    with pytest.raises(KitError, match="`model.timm_kwargs.act_layer: timm.layers.NoSuchLayer`: no such object"):
        build_model(ModelConfig(name=ARCHITECTURE, timm_kwargs={"act_layer": "timm.layers.NoSuchLayer"}))
    with pytest.raises(KitError, match="`model.timm_kwargs.init_values`: `resnet18` takes no such argument"):
        build_model(ModelConfig(name="resnet18", timm_kwargs={"init_values": 1e-5}))


def test_a_fold_trains_and_predicts_with_a_hub_model_offline(offline_cache, quick_config):
    source = tiny_vit()
    write_cache_entry(offline_cache, source)
    cfg = quick_config(epochs=1, batch_size=16, max_train_images=32, eval_batch_size=64, **{
        "folds.n_splits": 10, "model.name": HUB_NAME, "model.pretrained": True, "model.trainable_blocks": 2,
        "optimizer.layer_decay": 0.75, "tta.views": "none"})
    messages = []
    metrics = train_fold(cfg, 0, log=messages.append)
    assert metrics["epochs_trained"] == 1
    assert_the_best_epoch_is_kept(cfg, 0, metrics)
    assert any("takes only 32×32 input" in line for line in messages)
    assert any("the last 2 of 3 blocks and the head train" in line for line in messages)
    prediction = predict_test(cfg, allow_missing_folds=True, **QUIET)      # best.pt rebuilt from the cached config
    assert len(prediction.probabilities) == 48 and ((0 < prediction.probabilities) & (prediction.probabilities < 1)).all()


# ---- partial fine-tuning: trainable blocks and layer-wise lr decay ---------------------------------------------------

def tiny_vit_config(**overrides):
    return load_config("demo", {"model.name": ARCHITECTURE, "model.timm_kwargs": dict(TINY_VIT), "optimizer.name":
                                "adamw", "optimizer.lr": 1e-2, "optimizer.weight_decay": 0.05, **overrides})


def test_only_the_last_blocks_and_the_head_move_and_an_unfreeze_keeps_the_rest_frozen():
    cfg = tiny_vit_config(**{"model.trainable_blocks": 1, "train.ema_decay": 0.9})
    model = build_model(cfg.model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parts = build_training_parts(cfg, model, steps_per_epoch=4, amp_dtype=None)
    in_optimizer = {id(p) for group in parts.optimizer.param_groups for p in group["params"]}
    frozen = {name for name, p in model.named_parameters() if id(p) not in in_optimizer}
    assert frozen == model.frozen_parameter_names            # no optimizer state for what never trains
    assert {"net.cls_token", "net.pos_embed", "net.patch_embed.proj.weight", "net.blocks.1.mlp.fc2.weight"} <= frozen
    set_backbone_trainable(model, False)                      # train.freeze_backbone_epochs: the head alone …
    set_backbone_trainable(model, True)                       # … then the backbone, but only the trainable blocks
    assert not any(p.requires_grad for name, p in model.named_parameters() if name in frozen)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        inputs = torch.rand(8, 3, 96, 96, generator=generator)
        labels = torch.randint(0, 2, (8,), generator=generator).float()
        train_step(model, inputs, labels, parts, torch.device("cpu"), None, torch.zeros(()), hold_backbone_lr=False)
    after = model.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and not moved & frozen, "frozen blocks and the stem stay as loaded"
    assert {"net.blocks.2.attn.qkv.weight", "net.blocks.2.mlp.fc1.weight", "net.norm.weight", "net.head.weight"} <= moved
    ema = parts.ema.module.state_dict()
    assert all(torch.equal(ema[name], before[name]) for name in frozen)


def test_trainable_blocks_reach_cnn_stages_and_other_families_are_told():
    model = build_model(ModelConfig(name="resnet18", trainable_blocks=1))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("net.layer4.", "net.fc.")) for name in trained)
    assert "net.layer4.0.conv1.weight" in trained and "net.fc.weight" in trained
    for name in ("densenet121", "baseline_bn"):
        with pytest.raises(KitError, match=f"`model.trainable_blocks: 1`: `{name}` keeps no simple sequence of blocks"):
            build_model(ModelConfig(name=name, trainable_blocks=1))
    with pytest.raises(KitError, match="`resnet18` has 4 blocks; use 1 to 4, or 0 for all"):
        build_model(ModelConfig(name="resnet18", trainable_blocks=5))
    with pytest.raises(KitError, match="`model.trainable_blocks` must be at least 0"):
        load_config("demo", ["model.trainable_blocks=-1"])


def test_layer_decay_lowers_the_rate_with_depth_below_the_head_at_lr():
    cfg = tiny_vit_config(**{"optimizer.layer_decay": 0.5, "optimizer.backbone_lr_scale": 0.4})
    model = build_model(cfg.model)
    groups = parameter_groups(cfg, model)
    rates = {group["name"]: group["lr"] for group in groups}
    assert rates["head"] == rates["head_no_decay"] == 1e-2
    backbone = [group for group in groups if group["name"].startswith("backbone")]
    by_layer = {int(g["name"].split("_")[1][len("layer"):]): g["lr"] for g in backbone}
    layers = sorted(by_layer)
    assert layers == [0, 1, 2, 3]                        # the stem, then each of the 3 blocks (timm's layer map)
    for lower, upper in zip(layers, layers[1:]):
        assert by_layer[lower] == pytest.approx(by_layer[upper] * 0.5)          # halved for each layer further down
    assert by_layer[3] == pytest.approx(1e-2 * 0.4 * 0.5)                        # backbone_lr_scale composes
    # the same factors as timm's own param_groups_layer_decay (its `lr_scale`, which torch optimizers ignore)
    timm_scale = {id(p): g["lr_scale"] for g in param_groups_layer_decay(model.net, layer_decay=0.5)
                  for p in g["params"]}
    head = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    for group in backbone:
        for parameter in group["params"]:
            assert group["lr"] == pytest.approx(1e-2 * 0.4 * timm_scale[id(parameter)])
    assert {g["name"]: g["weight_decay"] for g in groups}["backbone_layer1_no_decay"] == 0.0   # norms, biases
    assert len(head) == 2
    partial = tiny_vit_config(**{"optimizer.layer_decay": 0.5, "model.trainable_blocks": 1})
    names = [group["name"] for group in parameter_groups(partial, build_model(partial.model))]
    assert names == ["backbone_layer3", "backbone_layer3_no_decay", "head", "head_no_decay"]
    with pytest.raises(KitError, match="`optimizer.layer_decay: 0.5`: `baseline_bn` has no layer map"):
        parameter_groups(load_config("demo", ["optimizer.layer_decay=0.5"]), build_model(ModelConfig()))
    with pytest.raises(KitError, match="`optimizer.layer_decay` must be at most 1.0"):
        load_config("demo", ["optimizer.layer_decay=1.5"])


def test_the_shipped_foundation_model_configs_check_without_the_network():
    for name, repo in (("h_optimus_0", "bioptimus/H-optimus-0"), ("uni2_h", "MahmoodLab/UNI2-h")):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model.name == f"hf-hub:{repo}" and cfg.model.pretrained and cfg.model.input_size == 224
        assert cfg.model.trainable_blocks and 0 < cfg.optimizer.layer_decay < 1
        header = (REPO / "configs" / f"{name}.yaml").read_text().split("\n\n")[0]
        assert "Licence" in header and "HF_TOKEN" in header and "never repackages weights" in header


def test_a_gated_model_without_access_says_to_use_your_own_token_and_never_shows_it(offline_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def refuse(*args, **kwargs):               # what the hub answers a token without access to a gated repository
        refused = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(refused, "403 Client Error: Cannot access gated repo")
        raise refused

    monkeypatch.setenv("HF_TOKEN", "hf_users_own_secret_token")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(KitError) as caught:
        build_model(load_config("uni2_h").model)
    message = str(caught.value)
    assert "a gated model: ask for access on https://huggingface.co/MahmoodLab/UNI2-h" in message
    assert "HF_TOKEN" in message and "hf auth login" in message and "hf_users_own_secret_token" not in message
