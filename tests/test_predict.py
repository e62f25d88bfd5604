from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kit.checkpoints import model_from_best
from kit.cli import main
from kit.data import read_image
from kit.errors import KitError
from kit.fold import train_fold
from kit.runs import fold_dir


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_train_all_then_predict_writes_a_validated_submission(quick_config, demo_data, tmp_path, capsys):
    cfg = quick_config(epochs=1)
    common = ["--config", "configs/demo.yaml", "--data-dir", str(demo_data), "--out", cfg.out_dir,
              "epochs=1", "folds.n_splits=2", "max_train_images=64", f"submissions_dir={cfg.submissions_dir}"]

    code, out, err = run_cli(capsys, "train", "--fold", "0", *common)
    assert code == 0 and "1,732,257 parameters" in out and "val_auc" in out

    code, out, err = run_cli(capsys, "predict", *common)
    assert code == 2 and "lacks finished folds 1 of 2" in err and "ALLOW_MISSING_FOLDS=1" in err
    assert not list((tmp_path / "submissions").glob("*.csv")), "a refused predict writes no submission"

    code, out, err = run_cli(capsys, "predict", "--allow-missing-folds", *common)
    assert code == 0 and "folds 0 × 8 TTA views" in out

    code, out, err = run_cli(capsys, "train-all", *common)
    assert code == 0 and "fold 0: already trained" in out
    code, out, err = run_cli(capsys, "predict", *common)
    assert code == 0
    path = out.strip().splitlines()[-1]                      # the CSV's path is the last line
    assert path.startswith(cfg.submissions_dir) and path.endswith(".csv") and "/demo-" in path
    assert "CV AUC (out-of-fold, 2 folds, 8 TTA views)" in out

    submission = pd.read_csv(path, dtype={"id": str})
    sample = pd.read_csv(demo_data / "sample_submission.csv", dtype={"id": str})
    assert list(submission.columns) == ["id", "label"]
    assert submission["id"].tolist() == sample["id"].tolist()
    assert submission["label"].between(0, 1).all() and submission["label"].nunique() > 1

    code, out, err = run_cli(capsys, "submit", "--file", path, "--dry-run")   # sample found via the .json sidecar
    assert code == 0 and "valid" in out and "nothing sent" in out

    # the values: the mean over both folds' best.pt of each one's mean probability over the 8 D4 views
    expected = np.mean([d4_probabilities(fold_dir(cfg, fold) / "best.pt", demo_data, sample["id"])
                        for fold in (0, 1)], axis=0)
    np.testing.assert_allclose(submission["label"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def d4_probabilities(best: Path, data_dir: Path, ids) -> np.ndarray:
    """The 8 D4 views (4 rotations, each also transposed) of each test image through the checkpoint's model,
    written out here rather than through ttach, and their probabilities averaged."""
    model, _ = model_from_best(best)
    images = np.stack([read_image(data_dir / "test" / f"{image_id}.tif") for image_id in ids])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    views = [torch.rot90(image, k, dims=(2, 3)) for image in (batch, batch.transpose(2, 3)) for k in range(4)]
    with torch.no_grad():
        return np.mean([torch.sigmoid(model.eval()(view).float()).reshape(-1).numpy() for view in views], axis=0)


def test_a_blend_of_experiments_with_other_folds_is_refused_before_predicting(quick_config, monkeypatch):
    from kit import predict

    quick = {"epochs": 1, "max_train_images": 32, "tta.views": "none"}
    first = quick_config(name="two_folds", **quick)
    second = quick_config(name="three_folds", **{"folds.n_splits": 3}, **quick)
    for cfg, folds in ((first, (0, 1)), (second, (0,))):
        for fold in folds:
            train_fold(cfg, fold, log=lambda *_: None)
    predicted = []
    monkeypatch.setattr(predict, "predict_test", lambda cfg, **_: predicted.append(cfg.name))
    with pytest.raises(KitError, match=r"blend members must hold out the same rows, but `two_folds` folds 0, 1 of "
                                       r"2 \(folds-.*-k2-seed42.csv\); `three_folds` folds 0 of 3 "
                                       r"\(folds-.*-k3-seed42.csv\).*\(nothing was predicted\)"):
        predict.predict_blend([first, second], allow_missing_folds=True, log=lambda *_: None)
    assert predicted == []
