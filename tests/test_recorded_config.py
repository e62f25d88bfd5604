"""Commands after training (predict, report, blend) take the config and data folder the folds recorded, for every key
the command line does not set, and say so; a set key that contradicts the folds, or another data folder whose labels
split otherwise, is refused in one line that offers the folds' value, never FORCE=1 (which would throw them away)."""

from pathlib import Path

import pandas as pd
import pytest

from kit import api
from kit.cli import main
from kit.config import load_config
from kit.errors import KitError
from kit.runs import fold_dir

REPO = Path(__file__).resolve().parent.parent
# what `make train-all CONFIG=configs/demo.yaml DATA_DIR=… ARGS='…'` trained with; configs/demo.yaml says 4 epochs,
# 3 folds, d4 TTA and data/demo
TRAINED_WITH = ["epochs=1", "folds.n_splits=2", "max_train_images=32", "batch_size=16", "tta.views=none"]


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """Two experiments (demo, and `other`: a copy of demo.yaml) trained with TRAINED_WITH on the demo data; returns
    the arguments every later command passes (where the runs and submissions go, and no other key)."""
    root = tmp_path_factory.mktemp("recorded")
    where = ["--out", str(root / "runs"), f"submissions_dir={root / 'submissions'}"]
    (root / "other.yaml").write_text((REPO / "configs" / "demo.yaml").read_text())
    for config in ("configs/demo.yaml", str(root / "other.yaml")):
        assert main(["train-all", "--config", config, "--data-dir", str(demo_data), *where, *TRAINED_WITH]) == 0
    return where, root


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_and_report_with_the_config_file_alone_use_the_folds_recorded_config_and_data(
        trained, demo_data, capsys):
    where, root = trained
    code, out, err = run_cli(capsys, "predict", "--config", "configs/demo.yaml", *where)
    assert code == 0, err
    lines = out.splitlines()
    (used,) = [line for line in lines if line.startswith("using the config recorded")]
    assert used.startswith(f"using the config recorded by the finished folds of `demo` "
                           f"({fold_dir(load_config('demo', {'out_dir': where[1]}), 0) / 'config.yaml'})")
    for key in TRAINED_WITH:
        assert key in used, f"{key} taken from the folds and named"
    assert f"using data folder {demo_data} recorded by the experiment's folds" in out
    assert "folds 0, 1 × 1 TTA views (none)" in out
    submission = pd.read_csv(lines[-1], dtype={"id": str})
    sample = pd.read_csv(demo_data / "sample_submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist()

    code, out, err = run_cli(capsys, "report", "--config", "configs/demo.yaml", "--saliency-images", "4", *where)
    assert code == 0, err
    assert f"using data folder {demo_data} recorded by the experiment's folds" in out
    report = Path(out.strip().splitlines()[-1]).read_text()
    assert "2 of 2 folds" in report or "folds 0, 1" in report
    assert "not found" not in report and "skipped" not in report.lower(), "the recorded data folder was used"

    # what the command sets still wins where it agrees with the folds; a blend takes each member's record too
    code, out, err = run_cli(capsys, "predict", "--config", "configs/demo.yaml", "--data-dir", str(demo_data),
                             "folds.n_splits=2", *where)
    assert code == 0 and "using data folder" not in out and "folds.n_splits=2" not in out
    code, out, err = run_cli(capsys, "predict", "--exps", f"demo {root / 'other.yaml'}", *where)
    assert code == 0 and "blend (mean) of demo + other" in out, err


def test_another_data_folder_given_explicitly_names_the_recorded_one_not_force(trained, demo_data, data_copy, capsys):
    where, _ = trained
    labels = pd.read_csv(data_copy / "train_labels.csv", dtype={"id": str})
    labels.loc[:9, "label"] = 1 - labels.loc[:9, "label"]          # another data set under the same layout
    labels.to_csv(data_copy / "train_labels.csv", index=False)
    for command in ("predict", "report"):
        code, out, err = run_cli(capsys, command, "--config", "configs/demo.yaml", "--data-dir", str(data_copy),
                                 *where)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"DATA_DIR={demo_data}" in err and str(data_copy) in err and "10 label(s) changed" in err
        assert "FORCE=1" not in err and "name=<new name>" in err


def test_a_set_key_that_contradicts_the_folds_is_one_line_naming_both_values(trained, capsys):
    where, _ = trained
    code, out, err = run_cli(capsys, "predict", "--config", "configs/demo.yaml", "folds.n_splits=3", *where)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "folds.n_splits=3 on this command contradicts the finished folds of `demo`" in err
    assert "trained with folds.n_splits=2" in err and "pass that value" in err and "name=<new name>" in err
    assert "FORCE=1" not in err

    code, out, err = run_cli(capsys, "report", "--config", "configs/demo.yaml", "seed=7", "tta.views=d4", *where)
    assert code == 2 and "seed=7, tta.views=d4 on this command contradict" in err
    assert "seed=42, tta.views=none" in err and "FORCE=1" not in err


def test_training_still_refuses_a_changed_config_naming_force(trained, demo_data, capsys):
    where, _ = trained
    code, out, err = run_cli(capsys, "train", "--fold", "0", "--config", "configs/demo.yaml", "--data-dir",
                             str(demo_data), *where, *TRAINED_WITH[:-1], "tta.views=hflip")
    assert code == 2 and "was trained with another config (tta.views" in err
    assert "FORCE=1" in err and "name=<new name>" in err


def test_a_config_not_made_by_load_config_is_taken_as_it_is(trained, demo_data):
    where, root = trained
    cfg = load_config("demo", {"out_dir": where[1], "data_dir": str(demo_data),          # 3 folds, 4 epochs, d4
                               "submissions_dir": str(root / "submissions")})
    with pytest.raises(KitError, match="was trained with another config"):
        api.predict(cfg, log=lambda *_: None)
    lines = []                                            # the same keys, told which ones the caller set
    assert api.predict(cfg, log=lines.append, explicit={"out_dir", "data_dir", "submissions_dir"}).is_file()
    assert any(line.startswith("using the config recorded") for line in lines)
