"""kit/recipe.py: loss options, learning rates per part and the schedules."""

import numpy as np
import pytest
import torch

from kit.config import load_config
from kit.models import build_model, head_parameter_names
from kit.recipe import build_loss, build_optimizer, build_scheduler

from conftest import REPO

SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
QUIET = {"log": lambda *_: None}


def test_loss_options():
    logits, targets = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    bce = build_loss(load_config("baseline").loss, torch.device("cpu"))
    torch.testing.assert_close(bce(logits, targets), torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
    weighted = build_loss(load_config("baseline", ["loss.pos_weight=2.0"]).loss, torch.device("cpu"))
    assert weighted(logits, targets) > bce(logits, targets)
    smoothed = build_loss(load_config("baseline", ["loss.label_smoothing=0.1"]).loss, torch.device("cpu"))
    torch.testing.assert_close(smoothed(logits, targets), torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.tensor([0.95, 0.05, 0.95])))
    focal = build_loss(load_config("convnext_nano").loss, torch.device("cpu"))
    p = torch.sigmoid(logits)
    p_t = torch.where(targets == 1, p, 1 - p)
    expected = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    torch.testing.assert_close(focal(logits, targets), expected)


def test_backbone_learning_rate_and_onecycle_schedule():
    cfg = load_config("resnet34", ["model.pretrained=false", "epochs=2"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg, model)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    for name in ("backbone", "backbone_no_decay"):
        assert groups[name]["lr"] == pytest.approx(cfg.optimizer.lr * cfg.optimizer.backbone_lr_scale)
    head = {id(p) for name in ("head", "head_no_decay") for p in groups[name]["params"]}
    assert head == {id(p) for n, p in model.named_parameters() if n in head_parameter_names(model)} and len(head) == 2
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(20):
        lrs.append(groups["head"]["lr"])
        optimizer.step()
        scheduler.step()
    assert int(np.argmax(lrs)) == round(0.25 * 20) - 1 and max(lrs) == pytest.approx(cfg.optimizer.lr)   # pct_start
    assert lrs[-1] < cfg.optimizer.lr / 100


def test_the_stall_warning_waits_for_enough_steps_and_follows_the_training_method():
    from kit.config import load_config
    from kit.features import HeadOnFrozenFeatures
    from kit.recipe import STALL_MIN_STEPS, stall_warning

    cfg = load_config("effnet_b0", {"model.pretrained": False})
    assert stall_warning(cfg, 0, 1, 0.6931, 0.6931, steps=3) is None, "3 steps of a tiny set say nothing yet"
    fine_tuning = stall_warning(cfg, 0, 2, 0.6931, 0.6931, steps=STALL_MIN_STEPS)
    assert "has not started learning" in fine_tuning and "a lower optimizer.lr" in fine_tuning
    head = stall_warning(cfg, 0, 2, 0.6931, 0.6931, HeadOnFrozenFeatures.stall_advice, steps=STALL_MIN_STEPS)
    assert "a higher optimizer.lr" in head and "lower" not in head
    assert stall_warning(cfg, 0, 2, 0.40, 0.6931, steps=STALL_MIN_STEPS) is None, "learning: no warning"
