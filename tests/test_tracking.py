"""The trackers (`log:`): one fold trained with TensorBoard, W&B (offline) and MLflow (a file store) on at once,
interrupted after its first epoch and resumed, then read back with each library's own reader."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest

from kit import distributed, tracking
from kit.config import apply_overrides, load_config
from kit.engine import train_fold
from kit.errors import KitError
from kit.runs import config_differences, fold_dir

from conftest import REPO

SECRET = "0123456789abcdef0123456789abcdef01234567"     # a W&B API key that must never reach a file
HISTORY_COLUMNS = ["train_loss", "val_loss", "val_auc", "lr", "images_per_s", "seconds", "peak_memory_mb"]


def metric_columns(history: pd.DataFrame) -> list[str]:
    """history.csv's columns with a number in every row (peak memory is empty on the CPU)."""
    return [column for column in HISTORY_COLUMNS if history[column].notna().all()]


def quick_tracked_config(demo_data: Path, root: Path, **overrides):
    values = {"data_dir": str(demo_data), "out_dir": str(root / "runs"), "submissions_dir": str(root / "subs"),
              "epochs": 2, "batch_size": 32, "folds.n_splits": 6, "eval_batch_size": 128, "max_train_images": 64,
              "tta.views": "none"}
    values.update(overrides)
    return load_config(REPO / "configs" / "demo.yaml", values)


def no_network(monkeypatch) -> None:
    """Any internet connection from this process fails the test (wandb's own service speaks over a Unix socket)."""
    connect = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a tracker tried to reach {address}")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


@pytest.fixture(scope="module")
def tracked(demo_data, tmp_path_factory):
    """Fold 0 with every tracker on, stopped by Ctrl-C after epoch 1 and resumed to epoch 2; HOME and the working
    directory are empty folders of their own."""
    root = tmp_path_factory.mktemp("tracked")
    home, cwd = root / "home", root / "cwd"
    home.mkdir()
    cwd.mkdir()
    cfg = quick_tracked_config(demo_data, root, **{
        "log.tensorboard": True, "log.wandb.project": "hcd-kit-test", "log.wandb.mode": "offline",
        "log.mlflow.tracking_uri": (root / "mlruns").as_uri()})
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in list(os.environ):
            if name.startswith(("WANDB_", "MLFLOW_", "XDG_")):
                monkeypatch.delenv(name)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_API_KEY", SECRET)
        monkeypatch.setenv("WANDB__DISABLE_STATS", "true")      # no system-metrics sampler: 2 s less per start
        monkeypatch.chdir(cwd)
        no_network(monkeypatch)

        def stop_after_first_epoch(epoch, row):
            if epoch == 1:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            train_fold(cfg, fold=0, on_epoch_end=stop_after_first_epoch, log=lambda *_: None)
        metrics = train_fold(cfg, fold=0, log=lambda *_: None)
        leftovers = {key: value for key, value in os.environ.items() if key.startswith(("WANDB_", "MLFLOW_"))}
    history = pd.read_csv(fold_dir(cfg, 0) / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    return {"cfg": cfg, "root": root, "home": home, "cwd": cwd, "metrics": metrics, "history": history,
            "environment_after": leftovers}


@pytest.mark.slow      # the shared fixture trains a fold twice (interrupted, then resumed)
def test_tensorboard_event_files_hold_every_epoch_once_after_a_resume(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, history = fold_dir(tracked["cfg"], 0), tracked["history"]
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1, "the resumed run's file replaced the first one"
    events = EventAccumulator(str(folder))
    events.Reload()
    for column in metric_columns(history):
        scalars = events.Scalars(column)
        assert [s.step for s in scalars] == [1, 2], column
        assert [s.value for s in scalars] == pytest.approx(history[column].tolist(), rel=1e-6), column
    (oof,) = events.Scalars("oof_auc")
    assert oof.value == pytest.approx(tracked["metrics"]["oof_auc"], rel=1e-6)
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"name: {tracked['cfg'].name}" in config_text and "optimizer:" in config_text


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (run-<id>.wandb, LevelDB's log format: 32 KiB blocks of chunks with a
    7-byte header), parsed with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", header
    while position + header <= len(data):
        if block - position % block < header:            # a block's tail too short for a chunk header: padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        pending += data[position + header:position + header + length]
        position += header + length
        if kind in (1, 4):                               # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@pytest.mark.slow      # the shared fixture trains a fold twice (interrupted, then resumed)
def test_wandb_offline_run_holds_the_config_every_epoch_once_and_the_final_numbers(tracked):
    cfg, history = tracked["cfg"], tracked["history"]
    runs = list((fold_dir(cfg, 0) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the resumed fold's offline run replaced the interrupted one"
    (log_file,) = runs[0].glob("run-*.wandb")
    records = wandb_records(log_file)

    def key(item):
        return item.key or ".".join(item.nested_key)

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_group == cfg.name and run.display_name == f"{cfg.name}-fold0" and run.project == "hcd-kit-test"
    config = {key(item): json.loads(item.value_json) for item in run.config.update}
    assert config["name"] == cfg.name and config["optimizer"]["lr"] == cfg.optimizer.lr
    rows = [{key(item): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    assert [row["epoch"] for row in rows] == [1, 2]
    for column in metric_columns(history):
        assert [row[column] for row in rows] == pytest.approx(history[column].tolist(), rel=1e-12), column
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in r.summary.update})
    assert summary["oof_auc"] == pytest.approx(tracked["metrics"]["oof_auc"])
    assert summary["best_epoch"] == tracked["metrics"]["best_epoch"]


@pytest.mark.slow      # the shared fixture trains a fold twice (interrupted, then resumed)
def test_mlflow_run_holds_the_params_every_epoch_once_and_the_final_numbers(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg, history = tracked["cfg"], tracked["history"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # a file store, as the kit's tracker allows it
    client = MlflowClient(tracking_uri=cfg.log.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"{cfg.name}-fold0" and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr) and run.data.tags["kit.fold"] == "0"
    for column in metric_columns(history):
        logged = client.get_metric_history(run.info.run_id, column)
        assert [m.step for m in logged] == [1, 2], column
        assert [m.value for m in logged] == pytest.approx(history[column].tolist(), rel=1e-12), column
    assert run.data.metrics["oof_auc"] == pytest.approx(tracked["metrics"]["oof_auc"])


@pytest.mark.slow      # the shared fixture trains a fold twice (interrupted, then resumed)
def test_trackers_write_nothing_outside_the_run_folder_and_keep_no_credentials(tracked):
    assert not list(tracked["cwd"].iterdir()), "nothing in the working directory (no ./wandb, ./mlruns)"
    assert not list(tracked["home"].rglob("*")), "nothing in HOME (no ~/.cache/wandb, ~/.config/mlflow)"
    assert set(tracked["environment_after"]) == {"WANDB_MODE", "WANDB_API_KEY", "WANDB__DISABLE_STATS"}, \
        "the trackers' own environment variables are put back"
    for path in tracked["root"].rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("setting, package", [
    ({"log.tensorboard": True}, "tensorboard"),
    ({"log.wandb.project": "p", "log.wandb.mode": "offline"}, "wandb"),
    ({"log.mlflow.tracking_uri": "file:///nowhere"}, "mlflow"),
])
def test_a_missing_tracker_package_is_one_line_before_any_training(demo_data, tmp_path, monkeypatch, setting,
                                                                    package):
    monkeypatch.setitem(sys.modules, package, None)      # `import <package>` fails as if it were not installed
    cfg = quick_tracked_config(demo_data, tmp_path, **setting)
    with pytest.raises(KitError) as err:
        train_fold(cfg, fold=0, log=lambda *_: None)
    message = str(err.value)
    assert "\n" not in message and f"needs the {package} package: pip install {tracking.PACKAGES[package]}" in message
    assert not (fold_dir(cfg, 0) / "history.csv").exists() and not (fold_dir(cfg, 0) / "last.pt").exists()


def test_log_keys_are_checked_and_never_block_a_resume(demo_data, tmp_path):
    cfg = quick_tracked_config(demo_data, tmp_path)
    with pytest.raises(KitError, match="did you mean log.wandb.project"):
        apply_overrides(cfg, {"log.wandb.projet": "p"})
    with pytest.raises(KitError, match="`log.wandb.mode` must be one of online, offline"):
        apply_overrides(cfg, {"log.wandb.mode": "cloud"})
    with pytest.raises(KitError, match="MLFLOW_TRACKING_PASSWORD"):
        apply_overrides(cfg, {"log.mlflow.tracking_uri": "https://me:hunter2@mlflow.example.com"})
    tracked = apply_overrides(cfg, {"log.tensorboard": True, "log.wandb.project": "p", "log.wandb.entity": "team",
                                    "log.mlflow.tracking_uri": "http://localhost:5000", "log.mlflow.experiment": "e"})
    assert config_differences(cfg, tracked) == []


def test_only_rank_0_of_a_ddp_run_logs(demo_data, tmp_path, monkeypatch):
    cfg = quick_tracked_config(demo_data, tmp_path, **{"log.tensorboard": True})
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(rank=1, world=2))
    with tracking.open_trackers(cfg, 0, tmp_path) as trackers:
        assert trackers.backends == []
    monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(rank=0, world=2))
    with tracking.open_trackers(cfg, 0, tmp_path) as trackers:
        assert [type(b).__name__ for b in trackers.backends] == ["TensorBoardTracker"]
