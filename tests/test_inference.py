"""kit/inference.py: logits in input order through a batch transform, and the TTA views' mean against the views
computed by hand (d4: 8, flip4: 4)."""

import numpy as np
import pytest
import torch
from torch import nn

from kit.augment import build_transform
from kit.config import ModelConfig
from kit.inference import predict_logits, predict_tta_probabilities
from kit.models import build_model


def test_validation_with_a_batch_transform_returns_logits_in_input_order():
    class MeanBrightness(nn.Module):                  # a flip-invariant "model": each image's own mean
        def forward(self, images):
            return images.mean((1, 2, 3))

    images = np.random.default_rng(3).integers(0, 256, (50, 96, 96, 3), dtype=np.uint8)
    flips = build_transform([{"name": "HorizontalFlip", "p": 0.5}, {"name": "VerticalFlip", "p": 0.5}], "augment.valid")
    logits = predict_logits(MeanBrightness(), images, None, 16, torch.device("cpu"), transform=flips)
    np.testing.assert_allclose(logits, images.mean((1, 2, 3)) / 255, rtol=1e-5)


@pytest.mark.parametrize("stacked_images", [2048, 4])     # all 8 views in one pass; 2 views a pass
def test_d4_tta_equals_the_mean_of_the_eight_views_by_hand(monkeypatch, stacked_images):
    import kit.inference

    monkeypatch.setattr(kit.inference, "STACKED_IMAGES", stacked_images)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="baseline")).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    got = predict_tta_probabilities(model, images, "d4", batch_size=2, device=torch.device("cpu"))

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    views = [torch.rot90(flipped, k, dims=(2, 3)) for flipped in (x, x.flip(3)) for k in range(4)]
    with torch.no_grad():
        per_view = torch.stack([torch.sigmoid(model(v)) for v in views])
    assert len({tuple(p.numpy().round(6)) for p in per_view}) == 8, "the views must differ for the test to mean much"
    np.testing.assert_allclose(got, per_view.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    no_tta = predict_tta_probabilities(model, images, "none", batch_size=2, device=torch.device("cpu"))
    np.testing.assert_allclose(no_tta, per_view[0].numpy(), rtol=1e-5, atol=1e-6)


def test_flip4_tta_is_the_mean_of_the_four_flips():
    from kit.inference import predict_tta_probabilities

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="baseline_bn")).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    got = predict_tta_probabilities(model, images, "flip4", batch_size=2, device=torch.device("cpu"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        views = [torch.sigmoid(model(v)) for v in (x, x.flip(3), x.flip(2), x.flip(2).flip(3))]
    np.testing.assert_allclose(got, torch.stack(views).mean(0).numpy(), rtol=1e-5, atol=1e-6)
