import subprocess
import sys

import pytest
import yaml

from kit import config
from kit.config import load_config, save_config
from kit.errors import KitError

from conftest import REPO


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configs_load_and_name_defaults_to_file_stem(tmp_path):
    for path in (REPO / "configs").glob("*.yaml"):
        assert load_config(path).name
    assert load_config(write(tmp_path, "epochs: 3\n", "my_run.yaml")).name == "my_run"


def test_overrides_reach_nested_keys_and_are_typed():
    cfg = load_config(REPO / "configs" / "baseline.yaml", ["epochs=3", "optimizer.lr=3e-4", "model.pretrained=true"])
    assert (cfg.epochs, cfg.optimizer.lr, cfg.model.pretrained) == (3, 3e-4, True)


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown config key `epoch`; did you mean epochs"),
    ("optimizer:\n  lr_rate: 0.1\n", "unknown config key `optimizer.lr_rate`; did you mean optimizer.lr"),
    ("epochs: three\n", "`epochs` must be an integer, got 'three'"),
    ("epochs: 0\n", "`epochs` must be at least 1"),
    ("optimizer:\n  name: adm\n", "`optimizer.name` must be one of adam, adamw, sgd"),
    ("optimizer:\n  lr: -1\n", "`optimizer.lr` must be greater than 0"),
    ("tta:\n  views: d8\n", "`tta.views` must be one of d4, flip4, hflip, none"),
    ("model: resnet\n", "`model` must be a section"),
    ("", "is empty"),
    ("- a\n- b\n", "expected `key: value` lines"),
    ("epochs: [1\n", "not valid YAML"),
])
def test_bad_config_files_are_refused_naming_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(KitError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_bad_overrides_are_refused():
    with pytest.raises(KitError, match="unknown config key `batchsize`; did you mean batch_size"):
        load_config(REPO / "configs" / "baseline.yaml", ["batchsize=8"])
    with pytest.raises(KitError, match="not key=value"):
        load_config(REPO / "configs" / "baseline.yaml", ["epochs"])
    with pytest.raises(KitError, match="unknown config key `model.nme`"):
        load_config(REPO / "configs" / "baseline.yaml", ["model.nme=x"])


def test_missing_config_lists_the_shipped_ones():
    with pytest.raises(KitError, match="config file not found: nope.yaml .*baseline.yaml"):
        load_config("nope.yaml")


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "baseline.yaml", ["epochs=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["epochs"] == 7


def test_cli_reports_a_config_error_in_one_line_and_exits_nonzero(tmp_path):
    path = write(tmp_path, "epoch: 3\n")
    result = subprocess.run([sys.executable, "-m", "kit", "train", "--config", str(path), "--fold", "0"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {path}: unknown config key `epoch`; did you mean epochs?"]
    assert "Traceback" not in result.stderr + result.stdout


# ---- each choice's names: declared by the schema, implemented under the same names --------------------------------

def test_every_optimizer_schedule_and_loss_name_has_an_implementation_and_no_other():
    from kit import recipe

    assert set(config.OPTIMIZERS) == set(recipe.OPTIMIZER_CLASSES)
    assert set(config.SCHEDULES) == set(recipe.SCHEDULE_FACTORS)
    assert set(config.LOSSES) == set(recipe.LOSS_FUNCTIONS)
    assert set(config.EXTENSIBLE_SCHEDULES) < set(config.SCHEDULES)


def test_every_tta_view_set_global_pool_and_frozen_head_has_an_implementation_and_no_other():
    from kit import inference, models

    assert set(config.TTA_VIEWS) == set(inference.TTA_TRANSFORMS)
    assert set(config.GLOBAL_POOLS) == set(models.GLOBAL_POOL_OPTIONS)
    assert set(config.FROZEN_HEADS) == set(models.FROZEN_HEAD_BUILDERS)


def test_every_precision_and_wandb_mode_has_an_implementation_and_no_other():
    from kit import device, tracking

    assert set(config.AMP_CHOICES) == {"auto", *device.AMP_DTYPES}
    assert set(config.WANDB_MODES) == set(tracking.WANDB_START_HINTS)


def test_every_device_and_input_path_name_is_one_the_code_accepts():
    import torch

    from kit.augment import build_transform, choose_input
    from kit.device import select_device

    assert select_device("auto").type in ("cpu", "cuda") and select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(KitError, match="no GPU"):
            select_device("cuda")
    assert set(config.DEVICES) == {"auto", "cpu", "cuda"}
    flips = build_transform([{"name": "HorizontalFlip", "p": 0.5}], "augment.train")
    assert {name: choose_input(name, flips, "augment.train").path for name in config.INPUT_PATHS} == {
        "auto": "batch", "batch": "batch", "albumentations": "albumentations"}
