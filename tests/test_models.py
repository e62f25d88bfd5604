import pytest
import torch

from kit import models
from kit.config import ModelConfig, load_config
from kit.errors import KitError
from kit.models import BaselineBNCNN, build_model, count_parameters

from conftest import REPO


def test_baseline_has_the_seed_parameter_count():
    # the seed notebook's Keras summary: Total params: 1,731,905
    assert count_parameters(build_model(ModelConfig(name="baseline"))) == 1_731_905


def test_baseline_returns_one_logit_per_image_and_normalises_itself():
    model = build_model(ModelConfig(name="baseline")).eval()
    logits = model(torch.rand(5, 3, 96, 96))
    assert logits.shape == (5,)
    # normalisation buffers travel with the weights, so a checkpoint alone reproduces predictions
    assert {"mean", "std"} <= set(model.state_dict())
    assert torch.isfinite(logits).all()


FAMILIES = ("baseline_bn", "efficientnet_b0", "tf_efficientnet_lite0", "resnet18", "resnet34", "convnext_nano",
            "densenet121", "densenet169")      # every family the README or the configs name


def shipped_model_options() -> dict[tuple, str]:
    """One shipped config per distinct set of model options (what a family may refuse), by those options."""
    options = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        model = load_config(path).model
        options.setdefault((model.dropout, model.drop_path, model.input_size, model.global_pool), path.stem)
    return options


@pytest.mark.parametrize("config", sorted(set(shipped_model_options().values())))
def test_every_named_family_builds_with_each_shipped_config_or_names_the_option_it_cannot_take(config):
    for family in FAMILIES:
        # timm_kwargs and trainable_blocks belong to the config's own architecture (a hub ViT's), not to every family
        cfg = load_config(config, {"model.name": family, "model.pretrained": False, "model.timm_kwargs": {},
                                   "model.trainable_blocks": 0})
        try:
            model = build_model(cfg.model)
        except KitError as err:
            message = str(err)
            assert "\n" not in message and f"`model.name: {family}`" in message, message
            if "drop_path" in message:
                assert "takes no `drop_path_rate`, which `model.drop_path` sets; set model.drop_path=0" in message
                fixed = {"model.drop_path": 0.0}
            else:
                assert "model.input_size and model.global_pool are for timm models" in message
                fixed = {"model.input_size": 0, "model.global_pool": ""}
            model = build_model(load_config(config, {"model.name": family, "model.pretrained": False,
                                                     "model.timm_kwargs": {}, "model.trainable_blocks": 0,
                                                     **fixed}).model)
        assert count_parameters(model) > 0


# ---- the architecture checked before it is built: one forward pass on the meta device ---------------------------

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}


def refusal(model_cfg: ModelConfig) -> str:
    with pytest.raises(KitError) as caught:
        build_model(model_cfg)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_timm_kwarg_the_model_cannot_work_with_is_one_line_naming_the_key_and_the_cause():
    # timm builds it; the first training step would have failed on 3-channel patches
    message = refusal(ModelConfig(name="resnet10t", timm_kwargs={"in_chans": 4}))
    assert message.startswith("config `model.timm_kwargs.in_chans: 4`: `resnet10t` built with it fails on a batch of "
                              "the kit's patches, (1, 3, 96, 96) RGB on [0, 1] (RuntimeError: ")
    assert "to have 4 channels, but got 3 channels instead" in message        # the CPU's words, not the meta device's
    assert message.endswith("change or drop it (the model card's timm.create_model arguments)")
    # timm itself fails (a TypeError deep in the ViT): the key is found among others that are fine
    message = refusal(ModelConfig(name="vit_tiny_patch16_224", timm_kwargs={**TINY_VIT, "depth": "abc"}))
    assert message.startswith("config `model.timm_kwargs.depth: abc`: `vit_tiny_patch16_224` cannot be built with it "
                              "(TypeError: ")
    vit = {**TINY_VIT, "in_chans": 1, "dynamic_img_size": True}
    assert "`model.timm_kwargs.in_chans: 1`" in refusal(ModelConfig(name="vit_tiny_patch16_224", timm_kwargs=vit))
    # two faults: the one the line shows (timm's TypeError comes first) is the one named
    assert refusal(ModelConfig(name="vit_tiny_patch16_224", timm_kwargs={**vit, "depth": "abc"})).startswith(
        "config `model.timm_kwargs.depth: abc`")
    # no key to blame: 4 px patches for 8 px tokens fail with any of them, so the model and its input size are named
    assert refusal(ModelConfig(name="vit_tiny_patch16_224", input_size=4, timm_kwargs={**vit, "in_chans": 3})
                   ).startswith("config `model.name: vit_tiny_patch16_224`: the model fails on a batch of the kit's "
                                "patches, (1, 3, 96, 96) RGB on [0, 1], resized to 4 px (AssertionError: Input "
                                "height (4) should be divisible by patch size (8)")
    # the fixed model builds: nothing else was wrong
    assert build_model(ModelConfig(name="vit_tiny_patch16_224", timm_kwargs={**vit, "in_chans": 3}))(
        torch.rand(2, 3, 96, 96)).shape == (2,)


def test_a_model_that_cannot_take_the_patches_without_any_timm_kwargs_is_named_with_the_input_size():
    message = refusal(ModelConfig(name="vgg11", input_size=16))
    assert message.startswith("config `model.name: vgg11`: the model fails on a batch of the kit's patches, "
                              "(1, 3, 96, 96) RGB on [0, 1], resized to 16 px (RuntimeError: ")
    assert message.endswith("set model.input_size to a size it takes (e.g. its pretrained 224), or choose another "
                            "model.name")
    assert count_parameters(build_model(ModelConfig(name="vgg11", input_size=32))) > 0


class ScalarReadingCNN(BaselineBNCNN):
    """A seed CNN whose forward reads a value (`.item()`): what the meta device, which holds no values, cannot run."""

    def forward(self, images):
        return super().forward(images) + 0.0 * images.mean().item()


class BrokenCNN(BaselineBNCNN):
    def forward(self, images):
        return super().forward(images[..., :40, :40])       # a flatten size that fits no Linear


def test_the_check_runs_on_the_meta_device_and_only_a_failure_there_costs_a_real_forward(monkeypatch):
    devices = []
    real_assemble = models.assemble_model

    def assemble(model_cfg, initial_weights=True):
        devices.append(torch.empty(0).device.type)          # the device the architecture is built on
        return real_assemble(model_cfg, initial_weights)

    monkeypatch.setattr(models, "assemble_model", assemble)
    build_model(ModelConfig(name="baseline_bn"))
    assert devices == ["meta", "cpu"]                        # the check on meta, then the model itself
    monkeypatch.setitem(models.BASELINES, "baseline_bn", ScalarReadingCNN)
    devices.clear()
    assert build_model(ModelConfig(name="baseline_bn"))(torch.rand(2, 3, 96, 96)).shape == (2,)
    assert devices == ["meta", "cpu", "cpu"]                 # meta cannot run it: tried for real, and it works
    monkeypatch.setitem(models.BASELINES, "baseline_bn", BrokenCNN)
    message = refusal(ModelConfig(name="baseline_bn"))
    assert message.startswith("config `model.name: baseline_bn`: the model fails on a batch of the kit's patches")
    assert "(RuntimeError: mat1 and mat2 shapes cannot be multiplied" in message


class PickledExtra:
    """An object a weights file must not hold: loading it would run this class's code."""


def test_a_weights_file_holding_pickled_objects_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": PickledExtra()}, weights)
    with pytest.raises(KitError) as refused:
        build_model(ModelConfig(name="resnet10t", pretrained_file=str(weights)))
    message = str(refused.value)
    assert "holds pickled Python objects" in message and "torch.save(model.state_dict()" in message
    assert "weights_only" not in message and len(message.splitlines()) == 1
