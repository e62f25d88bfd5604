import pandas as pd
import pytest

from kit.fold import train_fold
from kit.runs import fold_dir


@pytest.mark.slow
def test_short_training_learns(quick_config):
    cfg = quick_config(epochs=4, batch_size=16)
    metrics = train_fold(cfg, fold=0, log=lambda *_: None)
    # 160 held-out patches of generated data: chance is 0.5
    assert metrics["best_val_auc"] > 0.9
    out = fold_dir(cfg, 0)
    for name in ("best.pt", "last.pt", "history.csv", "oof.csv", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    oof = pd.read_csv(out / "oof.csv", dtype={"id": str})
    assert list(oof.columns) == ["id", "label", "pred"] and len(oof) == metrics["valid_images"]
    assert oof["pred"].between(0, 1).all()
    assert not list(out.glob(".*.tmp")), "atomic writes leave no temporary files behind"


@pytest.mark.slow
def test_finished_fold_is_not_retrained_unless_forced(quick_config):
    cfg = quick_config(epochs=1)
    train_fold(cfg, fold=0, log=lambda *_: None)
    best = fold_dir(cfg, 0) / "best.pt"
    stamp = best.stat().st_mtime_ns
    messages = []
    train_fold(cfg, fold=0, log=messages.append)
    assert best.stat().st_mtime_ns == stamp and "already trained" in messages[0]
    train_fold(cfg, fold=0, force=True, log=lambda *_: None)
    assert best.stat().st_mtime_ns != stamp
