import pytest
import torch

from kit.config import ModelConfig, load_config
from kit.errors import KitError
from kit.models import build_model, count_parameters

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
