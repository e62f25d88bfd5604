import torch

from kit.config import ModelConfig
from kit.models import build_model, count_parameters, example_input


def test_baseline_has_the_seed_parameter_count():
    # the seed notebook's Keras summary: Total params: 1,731,905
    assert count_parameters(build_model(ModelConfig(name="baseline"))) == 1_731_905


def test_baseline_returns_one_logit_per_image_and_normalises_itself():
    model = build_model(ModelConfig(name="baseline")).eval()
    logits = model(example_input(batch=5))
    assert logits.shape == (5,)
    # normalisation buffers travel with the weights, so a checkpoint alone reproduces predictions
    assert {"mean", "std"} <= set(model.state_dict())
    assert torch.isfinite(logits).all()
