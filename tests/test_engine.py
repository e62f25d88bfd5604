import pandas as pd
import pytest
import torch

from kit.checkpoints import load_checkpoint
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


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_interrupted_fold_resumes_from_the_saved_epoch_and_matches_an_uninterrupted_run(quick_config, tmp_path):
    cfg = quick_config(epochs=3)
    ran = []

    def stop_after_first_epoch(epoch, row):
        ran.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt      # what Ctrl-C does mid-run

    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, fold=1, on_epoch_end=stop_after_first_epoch, log=lambda *_: None)
    out = fold_dir(cfg, 1)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / "metrics.json").exists()
    # a GPU run's dropout draws from the CUDA generator, whose state no checkpoint holds: the resume must not need
    # the saved generator state, because every epoch seeds every generator from the run seed and the epoch
    state = load_checkpoint(out / "last.pt")
    state["torch_rng"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(state, out / "last.pt")

    messages = []
    train_fold(cfg, fold=1, on_epoch_end=lambda epoch, row: ran.append(epoch), log=messages.append)
    assert ran == [1, 2, 3], "the resumed run continues at epoch 2 instead of starting over"
    assert any("resuming after epoch 1" in m for m in messages)
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3]

    # same batches, augmentations and dropout as a run that was never interrupted
    straight = quick_config(epochs=3, out_dir=str(tmp_path / "straight"))
    train_fold(straight, fold=1, log=lambda *_: None)
    resumed_weights = load_checkpoint(out / "last.pt")["model"]
    straight_weights = load_checkpoint(fold_dir(straight, 1) / "last.pt")["model"]
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, msg=name)


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
