"""The trackers (`log:`): one fold trained with TensorBoard, W&B (offline) and MLflow (a file store) on at once,
interrupted after its first epoch and resumed, then read back with each library's own reader; then each backend
failing at each stage (start, log, finish, close), an MLflow server that does not answer, and the tracking URIs
MLflow takes or refuses."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import sys
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import pytest

from kit import distributed, tracking
from kit.config import apply_overrides, load_config
from kit.errors import Interrupted, KitError
from kit.fold import train_fold
from kit.runs import config_differences, fold_dir

from conftest import REPO

SECRET = "0123456789abcdef0123456789abcdef01234567"     # a W&B API key that must never reach a file
REAL_CONNECT = socket.socket.connect
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


def no_network(monkeypatch, allowed: tuple = ()) -> list:
    """Any internet connection from this process fails the test (wandb's own service speaks over a Unix socket),
    but one to an `allowed` (host, port) of the test's own; returns the list those attempts are recorded in."""
    attempts = []

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            if tuple(address[:2]) not in allowed:
                raise AssertionError(f"a tracker tried to reach {address}")
            attempts.append(address)
        return REAL_CONNECT(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    return attempts


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


# ----------------------------------------------------------------------------------------------------------------
# A tracker never stops the fold: failures, an unreachable server, tracking URIs
# ----------------------------------------------------------------------------------------------------------------

HISTORY = [{"epoch": epoch, "train_loss": 0.7 - epoch / 10, "val_loss": 0.6 - epoch / 10, "val_auc": 0.7 + epoch / 10,
            "lr": 1e-3, "images_per_s": 100.0, "seconds": 1.0, "peak_memory_mb": None} for epoch in (1, 2)]
METRICS = {"oof_auc": 0.85, "best_val_auc": 0.9, "best_epoch": 2, "epochs_trained": 2}
OFF = " is off: "                    # in the one line that says a tracker is off


@pytest.fixture
def tracker_environment(monkeypatch, tmp_path):
    """No W&B or MLflow variable of the user's, an empty HOME, no internet."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    no_network(monkeypatch)


class FakeSummary(dict):
    pass


class FakeWandbRun:
    """What the W&B tracker calls of a run: `wandb.init` returns it (a real one starts wandb's service: seconds)."""
    starting_step = 0

    def __init__(self):
        self.steps, self.summary, self.exit_code = [], FakeSummary(), None

    def log(self, values, step):
        self.steps.append(step)

    def finish(self, exit_code=None):
        self.exit_code = exit_code


class BackendDown(ConnectionError):
    """The faked failure of a backend's call."""


def make_fail(monkeypatch, target, name, when=lambda *args, **kwargs: True, after=False) -> None:
    """`target.name` raises BackendDown when `when(args…)` holds (after doing its work, if `after`)."""
    original = getattr(target, name)

    def failing(*args, **kwargs):
        if not when(*args, **kwargs):
            return original(*args, **kwargs)
        if after:
            original(*args, **kwargs)
        raise BackendDown("the backend is down")

    monkeypatch.setattr(target, name, failing)


def fake_failure(monkeypatch, backend: str, stage: str) -> None:
    """The call of `backend` that `stage` makes fail."""
    import wandb
    from mlflow.tracking import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

    calls = {
        ("TensorBoard", "start"): (SummaryWriter, "add_text", {}),
        ("TensorBoard", "log"): (SummaryWriter, "add_scalar", {}),
        ("TensorBoard", "finish"): (SummaryWriter, "add_scalar", {"when": lambda self, tag, *a, **k: tag == "oof_auc"}),
        ("TensorBoard", "close"): (SummaryWriter, "close", {"after": True}),
        ("W&B", "start"): (wandb, "init", {}),
        ("W&B", "log"): (FakeWandbRun, "log", {}),
        ("W&B", "finish"): (FakeSummary, "update", {}),
        ("W&B", "close"): (FakeWandbRun, "finish", {"after": True}),
        ("MLflow", "start"): (MlflowClient, "create_run", {}),
        ("MLflow", "log"): (MlflowClient, "log_batch", {"when": lambda self, run_id, metrics=(), **k: bool(metrics)}),
        ("MLflow", "finish"): (MlflowClient, "set_terminated",
                               {"when": lambda self, run_id, status=None, **k: status == "FINISHED"}),
        ("MLflow", "close"): (MlflowClient, "set_terminated", {}),
    }
    target, name, options = calls[(backend, stage)]
    make_fail(monkeypatch, target, name, **options)


def mlflow_run(uri: str, monkeypatch):
    """The one run in an MLflow store, read back with MLflow's client, and its val_auc steps."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    assert len(runs) == 1
    return runs[0].info.status, [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_auc")]


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [s.step for s in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


STAGE_WORDS = {"start": "starting its run", "log": "logging epoch 1", "finish": "logging the fold's final metrics",
               "close": "ending its run"}


@pytest.mark.parametrize("stage", ["start", "log", "finish", "close"])
@pytest.mark.parametrize("failing", ["TensorBoard", "W&B", "MLflow"])
def test_a_failing_tracker_is_one_line_and_the_others_log_everything(demo_data, tmp_path, monkeypatch,
                                                                      tracker_environment, failing, stage):
    import wandb

    wandb_run = FakeWandbRun()
    monkeypatch.setattr(wandb, "init", lambda **options: wandb_run)
    uri = (tmp_path / "mlruns").as_uri()
    cfg = quick_tracked_config(demo_data, tmp_path, **{
        "log.tensorboard": True, "log.wandb.project": "p", "log.wandb.mode": "offline",
        "log.mlflow.tracking_uri": uri})
    fake_failure(monkeypatch, failing, stage)
    run_dir, lines = tmp_path / "fold0", []
    run_dir.mkdir()
    fold_error = RuntimeError("the fold's own error")
    # the fold logs two epochs, then finishes, or (to close with an error) fails
    with pytest.raises(RuntimeError) if stage == "close" else nullcontext() as raised:
        with tracking.open_trackers(cfg, 0, run_dir, log=lines.append) as trackers:
            trackers.log_epochs(HISTORY[:1])
            assert [backend.logged for backend in trackers.backends] == [1] * (3 - (stage in ("start", "log"))), \
                "the others log the epoch as it ends, not one later"
            trackers.log_epochs(HISTORY)
            if stage == "close":
                raise fold_error
            trackers.finish(HISTORY, METRICS)
    if stage == "close":
        assert raised.value is fold_error, "a tracker failing to close never hides the fold's own error"
    (off,) = [line for line in lines if OFF in line]
    assert off.startswith(f"{failing} tracking of fold 0 is off: {STAGE_WORDS[stage]} failed (the backend is down)")
    assert "\n" not in off
    if (failing, stage) == ("W&B", "start"):
        assert tracking.WANDB_START_HINTS["offline"] in off
    finished = stage != "close"
    if failing != "TensorBoard":
        assert tensorboard_steps(run_dir, "val_auc") == [1, 2]
        assert tensorboard_steps(run_dir, "oof_auc") == ([2] if finished else [])
    if failing != "W&B":
        assert wandb_run.steps == [1, 2] and ("oof_auc" in wandb_run.summary) == finished
        assert wandb_run.exit_code == (0 if finished else 1)
    elif stage in ("log", "finish"):
        assert wandb_run.exit_code == 1, "the run of a W&B tracker turned off ends as failed"
    status, steps = mlflow_run(uri, monkeypatch) if (failing, stage) != ("MLflow", "start") else (None, None)
    if failing != "MLflow":
        assert (status, steps) == ("FINISHED" if finished else "FAILED", [1, 2])
    elif stage in ("log", "finish"):
        assert status == "FAILED", "the run of an MLflow tracker turned off ends as failed"


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"), (Interrupted("stopped"), "KILLED"),
                                           (RuntimeError("the fold failed"), "FAILED")])
def test_an_interrupted_folds_run_is_killed_and_a_failed_ones_failed(demo_data, tmp_path, monkeypatch,
                                                                      tracker_environment, error, status):
    import wandb

    wandb_run = FakeWandbRun()
    monkeypatch.setattr(wandb, "init", lambda **options: wandb_run)
    uri = (tmp_path / "mlruns").as_uri()
    cfg = quick_tracked_config(demo_data, tmp_path, **{"log.wandb.project": "p", "log.wandb.mode": "offline",
                                                       "log.mlflow.tracking_uri": uri})
    with pytest.raises(type(error)):
        with tracking.open_trackers(cfg, 0, tmp_path, log=lambda *_: None) as trackers:
            trackers.log_epochs(HISTORY[:1])
            raise error
    assert mlflow_run(uri, monkeypatch) == (status, [1])
    assert wandb_run.exit_code == 1


def refusing_address():
    """A loopback address that refuses connections: a TCP socket bound by the test and never listening (its port
    stays the test's own until the socket is closed)."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", 0))
    return held, held.getsockname()


def test_an_unreachable_mlflow_server_is_one_line_after_a_few_tries_and_the_fold_goes_on(
        demo_data, tmp_path, monkeypatch, tracker_environment):
    from urllib3.util.retry import Retry

    held, address = refusing_address()
    attempts = no_network(monkeypatch, allowed=(address,))
    backoffs = []                                  # urllib3's waits between tries: recorded, not slept
    monkeypatch.setattr(Retry, "_sleep_backoff", lambda retry: backoffs.append(retry.get_backoff_time()))
    cfg = quick_tracked_config(demo_data, tmp_path, **{"log.tensorboard": True,
                                                       "log.mlflow.tracking_uri": f"http://{address[0]}:{address[1]}"})
    lines = []
    with held, tracking.open_trackers(cfg, 0, tmp_path, log=lines.append) as trackers:
        assert [type(backend).__name__ for backend in trackers.backends] == ["TensorBoardTracker"]
        trackers.log_epochs(HISTORY)
        trackers.finish(HISTORY, METRICS)
    (off,) = [line for line in lines if OFF in line]
    assert off == ("MLflow tracking of fold 0 is off: reaching its store failed (Connection refused); check "
                   "`log.mlflow.tracking_uri` and that its server runs; the fold trains on without it")
    assert lines[-1] == f"tracking fold 0 from its first checkpoint on: TensorBoard event files in {tmp_path}"
    box = {name: float(value) for name, value in tracking.MLFLOW_TIME_BOX.items()}
    retries = int(box["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert 1 <= len(attempts) <= 1 + retries, "one time-boxed request, then the tracker is off (MLflow: 8 tries)"
    assert sum(backoffs) <= retries * (box["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] * 2 ** retries
                                       + box["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
    assert not any(name.startswith("MLFLOW_") for name in os.environ), "the time box is lifted once it is off"
    assert tensorboard_steps(tmp_path, "val_auc") == [1, 2]


def test_mlflow_takes_a_folder_path_as_its_tracking_uri(demo_data, tmp_path, monkeypatch, tracker_environment):
    monkeypatch.chdir(tmp_path)
    cfg = quick_tracked_config(demo_data, tmp_path, **{"log.mlflow.tracking_uri": "./mlruns"})
    lines = []
    with tracking.open_trackers(cfg, 0, tmp_path / "fold0", log=lines.append) as trackers:
        trackers.log_epochs(HISTORY)
        trackers.finish(HISTORY, METRICS)
    assert not [line for line in lines if OFF in line]
    assert mlflow_run("./mlruns", monkeypatch) == ("FINISHED", [1, 2])
    assert (tmp_path / "mlruns").is_dir()


def test_a_database_tracking_uri_works_or_is_one_line_naming_the_key(demo_data, tmp_path, monkeypatch,
                                                                      tracker_environment):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = quick_tracked_config(demo_data, tmp_path, **{"log.mlflow.tracking_uri": uri})
    if importlib.util.find_spec("sqlalchemy") is None:       # mlflow-skinny alone has no database store
        with pytest.raises(KitError) as err:
            train_fold(cfg, fold=0, log=lambda *_: None)
        assert str(err.value) == (
            f"config `log.mlflow.tracking_uri` {uri}: this MLflow has no store for `sqlite:` URIs (a database store "
            f"needs the full package: pip install mlflow); set a folder it can write (./mlruns or "
            f"file:///path/mlruns), an http(s):// server, or \"\" to turn MLflow off")
        assert not (fold_dir(cfg, 0) / "last.pt").exists()
    else:
        with tracking.open_trackers(cfg, 0, tmp_path / "fold0", log=lambda *_: None) as trackers:
            trackers.log_epochs(HISTORY)
            trackers.finish(HISTORY, METRICS)
        assert mlflow_run(uri, monkeypatch) == ("FINISHED", [1, 2])


@pytest.mark.parametrize("make_uri, why", [
    (lambda root: (root / "a-file" / "mlruns").as_uri(), "MLflow cannot open it as a store: Not a directory"),
    (lambda root: "nosuchscheme://host/store", "this MLflow has no store for `nosuchscheme:` URIs;"),
])
def test_a_tracking_uri_mlflow_cannot_use_is_one_line_naming_the_key_before_training(
        demo_data, tmp_path, tracker_environment, make_uri, why):
    (tmp_path / "a-file").write_text("in the way of a folder")
    uri = make_uri(tmp_path)
    cfg = quick_tracked_config(demo_data, tmp_path, **{"log.mlflow.tracking_uri": uri})
    with pytest.raises(KitError) as err:
        train_fold(cfg, fold=0, log=lambda *_: None)
    message = str(err.value)
    assert message.startswith(f"config `log.mlflow.tracking_uri` {uri}: {why}") and "\n" not in message
    assert "OUT=" not in message
    assert not (fold_dir(cfg, 0) / "last.pt").exists()
