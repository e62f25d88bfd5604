"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each optional (the config's `log:` section).

A fold that trains opens them (`open_trackers`); they log each epoch's history.csv row and, when the fold is
finished, metrics.json's numbers. Under DDP only rank 0 logs; a `train-all PARALLEL=N` worker logs its own fold.

Every backend starts writing only once the fold has its first checkpoint, so what it writes lands in the fold's
final folder (a FORCE=1 retrain writes into .fold<k>.new/ until then, and an unfinished first epoch leaves nothing
a fresh start would have to delete), and it is handed the whole history: a resumed fold's tracker run holds every
epoch once, the ones trained before the interruption included. Everything they write stays in the run folder (or
the MLflow store the config names); the config logged is the kit's config, never a credential.

A tracker watches a run and never stalls or fails it: a missing package or a tracking URI MLflow cannot use stops the
fold before it trains (one line naming the key); once the fold runs, a backend that fails (a server down, a write
refused) is said in one line to be off, and the fold trains on with the others. MLflow's requests are time-boxed.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from . import distributed
from .config import Config, to_dict
from .errors import KitError, first_line
from .progress import say
from .runs import RECORD, flat_config, read_json

# log.wandb.mode (config.WANDB_MODES) → what to do when W&B cannot start a run in that mode
WANDB_START_HINTS = {"online": "run `wandb login` or set WANDB_API_KEY, or use log.wandb.mode=offline",
                     "offline": "check log.wandb"}

# MLflow's HTTP client tries an unanswered request 8 times over ~4 minutes (backoff 2 s doubling to 120 s, each try
# waiting up to 120 s): a tracker gives each request 3 tries of at most 10 s, 0 and 2–3 s apart, so a store that is
# down holds a fold for at most ~35 s, once (its tracker is off after the first failure). Set only where unset.
MLFLOW_TIME_BOX = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

# What to install for each backend: the versions the tests run (requirements.txt).
PACKAGES = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0", "mlflow": "mlflow-skinny==3.17.2"}


def require_package(module: str, setting: str):
    """The backend's package, or one line naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KitError(f"config `{setting}` needs the {module} package: pip install {PACKAGES[module]} (or pip "
                       f"install '.[tracking]'), or turn it off") from None


def numbers(values: dict) -> dict[str, float]:
    """The entries a tracker can chart: ints and floats, not flags or missing values."""
    return {key: value for key, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}


def attempt_key(cfg: Config, fold: int, run_dir: Path) -> str:
    """One id per attempt at a fold: the same when it resumes (or `epochs` is raised), new when FORCE=1 retrains it
    (run.json's creation time changes). Names the fold's W&B run and tags its MLflow run."""
    created = (read_json(run_dir / RECORD) or {}).get("created", "")
    digest = hashlib.sha1(f"{cfg.name}/{fold}/{created}".encode()).hexdigest()[:12]
    return f"fold{fold}-{digest}"


def with_environment(defaults: dict[str, str]) -> dict[str, str | None]:
    """Set each variable the user has not set; return the previous values, for `restore_environment`."""
    previous = {}
    for name, value in defaults.items():
        if name not in os.environ:
            previous[name] = None
            os.environ[name] = value
    return previous


def restore_environment(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ----------------------------------------------------------------------------------------------------------------
# The backends: each starts once, then logs the rows it has not logged
# ----------------------------------------------------------------------------------------------------------------

class Tracker:
    """A backend. `connect()` reaches its store when the fold opens its trackers, `start(history)` opens its run
    and returns the last epoch the run already holds (0 for none)."""

    name = ""                                # in the lines that say a backend is off

    def __init__(self, cfg: Config, fold: int, run_dir: Path):
        self.cfg, self.fold, self.run_dir = cfg, fold, run_dir
        self.logged: int | None = None        # the last epoch logged; None until started

    def connect(self) -> None:
        pass

    def advice(self, stage: str) -> str:
        """What to do when `stage` (a key of STAGES) failed: "" for nothing specific."""
        return ""

    def log_epochs(self, history: list[dict]) -> None:
        if self.logged is None:
            self.logged = self.start(history)
        for row in history:
            if row["epoch"] > self.logged:
                self.log_row(row)
                self.logged = row["epoch"]
        self.flush()

    def start(self, history: list[dict]) -> int:
        raise NotImplementedError

    def log_row(self, row: dict) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def finish(self, metrics: dict) -> None:
        raise NotImplementedError

    def close(self, error: BaseException | None) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in the fold folder (`tensorboard --logdir runs/<experiment>` shows each fold as a run). They are
    written anew from the history when a process starts logging, so a resumed fold has each epoch once."""

    name = "TensorBoard"

    def __init__(self, cfg: Config, fold: int, run_dir: Path):
        super().__init__(cfg, fold, run_dir)
        require_package("tensorboard", "log.tensorboard: true")
        from torch.utils.tensorboard import SummaryWriter
        self.writer_class, self.writer = SummaryWriter, None

    def start(self, history: list[dict]) -> int:
        for old in self.run_dir.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = self.writer_class(log_dir=str(self.run_dir))
        text = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))   # markdown code
        return 0

    def log_row(self, row: dict) -> None:
        for key, value in numbers(row).items():
            if key != "epoch":
                self.writer.add_scalar(key, value, global_step=row["epoch"])

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, metrics: dict) -> None:
        for key in ("oof_auc", "best_val_auc"):
            self.writer.add_scalar(key, metrics[key], global_step=metrics["epochs_trained"])
        self.writer.flush()

    def close(self, error: BaseException | None) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker(Tracker):
    """A W&B run per fold attempt, grouped by experiment, its files in fold<k>/wandb/ (and wandb's own cache and
    logs there too, not in ~). Online, a resumed fold continues its run; offline, its unsynced run is written anew."""

    name = "W&B"

    def __init__(self, cfg: Config, fold: int, run_dir: Path):
        super().__init__(cfg, fold, run_dir)
        self.wandb = require_package("wandb", "log.wandb.project")
        self.run, self.environment, self.started = None, {}, False

    def advice(self, stage: str) -> str:
        return WANDB_START_HINTS[self.cfg.log.wandb.mode] if stage == "start" else ""

    def start(self, history: list[dict]) -> int:
        settings, online = self.cfg.log.wandb, self.cfg.log.wandb.mode == "online"
        key = attempt_key(self.cfg, self.fold, self.run_dir)
        folder = self.run_dir / "wandb"
        if not online:
            for old in folder.glob(f"offline-run-*-{key}"):
                shutil.rmtree(old)
        # read when wandb starts its service; WANDB_DIR by `dir` below
        self.environment = with_environment({"WANDB_CACHE_DIR": str(folder / "cache"),
                                             "WANDB_DATA_DIR": str(folder / "data"),
                                             "WANDB_ARTIFACT_DIR": str(folder / "artifacts")})
        self.started = True
        self.run = self.wandb.init(
            project=settings.project, entity=settings.entity or None, group=self.cfg.name,
            name=f"{self.cfg.name}-fold{self.fold}", id=key, resume="allow" if online else None,
            mode=settings.mode, dir=str(self.run_dir), config=to_dict(self.cfg), reinit="create_new",
            settings=self.wandb.Settings(console="off", silent=True))
        return max(self.run.starting_step - 1, 0)       # steps are epochs; a resumed online run has its first ones

    def log_row(self, row: dict) -> None:
        self.run.log(numbers(row), step=row["epoch"])

    def finish(self, metrics: dict) -> None:
        self.run.summary.update({key: value for key, value in metrics.items() if value is not None})

    def close(self, error: BaseException | None) -> None:
        try:
            if self.run is not None:
                self.run.finish(exit_code=0 if error is None else 1)
            if self.started and self.wandb.run is None:   # no run of the caller's own is active: end wandb's
                self.wandb.teardown()                     # service, so the next fold's starts with its folders
        finally:
            restore_environment(self.environment)


class MlflowTracker(Tracker):
    """An MLflow run per fold attempt in the configured store (any tracking URI MLflow accepts: a folder, file:,
    http(s):, a database with the full mlflow package), tagged with the attempt: a resumed fold finds its run and logs
    the epochs it lacks. A URI MLflow cannot use stops the fold before it trains; a store that does not answer when
    the fold starts (`connect`) turns the tracker off."""

    name = "MLflow"

    def __init__(self, cfg: Config, fold: int, run_dir: Path):
        super().__init__(cfg, fold, run_dir)
        uri = cfg.log.mlflow.tracking_uri
        require_package("mlflow", "log.mlflow.tracking_uri")
        # no usage reports and no ~/.config/mlflow; requests time-boxed; a file store (a path or file: URI) is
        # refused unless allowed (MLflow 3 prefers a database, which needs the full mlflow package)
        self.environment = with_environment({"MLFLOW_DISABLE_TELEMETRY": "true", **MLFLOW_TIME_BOX,
                                             **({"MLFLOW_ALLOW_FILE_STORE": "true"}
                                                if urlsplit(uri).scheme in ("", "file") else {})})
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient

            self.metric_class, self.param_class, self.run_id, self.experiment_id = Metric, Param, None, None
            try:
                self.client = MlflowClient(tracking_uri=uri)     # builds the store: no request to a server yet
            except Exception as err:
                raise KitError(unusable_store(uri, err)) from None
        except BaseException:
            restore_environment(self.environment)
            raise

    def advice(self, stage: str) -> str:
        return "check `log.mlflow.tracking_uri` and that its server runs" if stage in ("connect", "start") else ""

    def connect(self) -> None:
        from mlflow.exceptions import MlflowException

        name = self.cfg.log.mlflow.experiment or self.cfg.name
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                self.experiment_id = self.client.create_experiment(name)
                return
            except MlflowException:              # another fold's process created it meanwhile
                found = self.client.get_experiment_by_name(name)
        self.experiment_id = found.experiment_id

    def start(self, history: list[dict]) -> int:
        key = attempt_key(self.cfg, self.fold, self.run_dir)
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`kit.attempt` = '{key}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return max((m.step for m in self.client.get_metric_history(self.run_id, "val_auc")), default=0)
        tags = {"kit.attempt": key, "kit.experiment": self.cfg.name, "kit.fold": str(self.fold)}
        self.run_id = self.client.create_run(self.experiment_id, run_name=f"{self.cfg.name}-fold{self.fold}",
                                             tags=tags).info.run_id
        # every key as a param (MLflow keeps at most 6,000 characters of one: longer lists only in config.yaml)
        params = [self.param_class(key, str(value)) for key, value in flat_config(self.cfg, neutral=()).items()
                  if len(str(value)) <= 6000]
        for first in range(0, len(params), 100):             # at most 100 params a call
            self.client.log_batch(self.run_id, params=params[first:first + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(to_dict(self.cfg), sort_keys=False), "config.yaml")
        return 0

    def log_metrics(self, values: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric_class(key, float(value), now, step)
                                                    for key, value in values.items()])

    def log_row(self, row: dict) -> None:
        self.log_metrics({k: v for k, v in numbers(row).items() if k != "epoch"}, row["epoch"])

    def finish(self, metrics: dict) -> None:
        self.log_metrics(numbers(metrics), metrics["epochs_trained"])
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self, error: BaseException | None) -> None:
        try:
            if self.run_id is not None and error is not None:    # Ctrl-C (an Interrupted too): KILLED
                self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else
                                           "FAILED")
        finally:
            restore_environment(self.environment)


def unusable_store(uri: str, err: Exception) -> str:
    """One line for a tracking URI MLflow cannot build a store from: the key, why, and what to set instead."""
    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    scheme = urlsplit(uri).scheme
    if isinstance(err, UnsupportedModelRegistryStoreURIException):     # raised for tracking URIs too
        why = f"this MLflow has no store for `{scheme}:` URIs"
        if scheme.split("+")[0] in DATABASE_ENGINES:
            why += " (a database store needs the full package: pip install mlflow)"
    else:
        why = f"MLflow cannot open it as a store: {failure_reason(err)}"
    return (f"config `log.mlflow.tracking_uri` {uri}: {why}; set a folder it can write (./mlruns or "
            f"file:///path/mlruns), an http(s):// server, or \"\" to turn MLflow off")


def failure_reason(err: BaseException) -> str:
    """An error in a few words: the OS's own when a connection or file failed, even wrapped in a long line (MLflow's
    "API request to … failed with exception HTTPConnectionPool(…): … [Errno 111] Connection refused")."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {err.filename}" if err.filename else "")
    wrapped = re.search(r"\[Errno -?\d+\] ([^\"'()\[\]]+)", str(err))
    return wrapped.group(1).strip(" :") if wrapped else first_line(err)


# ----------------------------------------------------------------------------------------------------------------
# The fold's trackers
# ----------------------------------------------------------------------------------------------------------------

# what a backend was doing when it failed, in the line that says it is off
STAGES = {"connect": "reaching its store", "start": "starting its run", "log": "logging epoch {epoch}",
          "finish": "logging the fold's final metrics", "close": "ending its run"}


class Trackers:
    """The fold's trackers together; a context manager that ends their runs however the fold ends. A backend that
    fails is said to be off in one line and left out from then on: it never stops the fold, hides the fold's own
    error, or keeps the other backends from logging and closing."""

    def __init__(self, backends: list[Tracker], fold: int = 0, log=say):
        self.backends, self.fold, self.log = backends, fold, log

    def off(self, backend: Tracker, stage: str, err: Exception, epoch: int | None = None) -> None:
        """Say in one line that `backend` is off, why and what to do; end its run (failed) if it is still open."""
        if backend in self.backends:
            self.backends.remove(backend)
        advice = [text for text in (backend.advice(stage),
                                    "its run may show as unfinished" if stage == "close" else
                                    "the fold trains on without it") if text]
        self.log(f"{backend.name} tracking of fold {self.fold} is off: "
                 f"{STAGES[stage].format(epoch=epoch)} failed ({failure_reason(err)}); {'; '.join(advice)}")
        if stage != "close":
            try:
                backend.close(err)
            except Exception:            # already said to be off; its run ends with the process
                pass

    def connect(self) -> None:
        """Reach each backend's store (MLflow's server) now, before the fold trains."""
        for backend in list(self.backends):
            try:
                backend.connect()
            except Exception as err:
                self.off(backend, "connect", err)

    def log_epochs(self, history: list[dict]) -> None:
        """Log the epochs of `history` not logged yet (call it once the epoch's checkpoint is written)."""
        for backend in list(self.backends):
            try:
                backend.log_epochs(history)
            except Exception as err:          # `logged` is set once the backend's run has started
                self.off(backend, "start" if backend.logged is None else "log", err,
                         epoch=history[-1]["epoch"] if history else 0)

    def finish(self, history: list[dict], metrics: dict) -> None:
        """The fold is finished: any epoch not logged yet (a fold resumed only to finish), then its metrics."""
        self.log_epochs(history)
        for backend in list(self.backends):
            try:
                backend.finish(metrics)
            except Exception as err:
                self.off(backend, "finish", err)

    def close(self, error: BaseException | None = None) -> None:
        """End every backend's run (failed, or killed by Ctrl-C, when `error` ended the fold); a backend that fails
        to close is one line, and never hides `error` nor stops the others closing."""
        for backend in list(self.backends):
            try:
                backend.close(error)
            except Exception as err:
                self.off(backend, "close", err)
        self.backends = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(error)


def open_trackers(cfg: Config, fold: int, run_dir: Path, log=say) -> Trackers:
    """The trackers `cfg.log` turns on for fold `fold`, whose final folder is `run_dir`, with a line saying where
    each writes; none on a DDP rank other than 0. A missing package or a tracking URI MLflow cannot use fails here,
    before any training; a store that does not answer is one line, and the fold trains without that tracker."""
    if not distributed.current().is_main:
        return Trackers([], fold, log)
    run_dir = Path(run_dir)
    wanted = [(cfg.log.tensorboard, TensorBoardTracker, f"TensorBoard event files in {run_dir}"),
              (bool(cfg.log.wandb.project), WandbTracker,
               f"W&B {cfg.log.wandb.mode} run in project {cfg.log.wandb.project} (files in {run_dir / 'wandb'}"
               + (f"; upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`)" if cfg.log.wandb.mode == "offline"
                  else ")")),
              (bool(cfg.log.mlflow.tracking_uri), MlflowTracker, f"MLflow run in {cfg.log.mlflow.tracking_uri}")]
    trackers, where = Trackers([], fold, log), {}
    try:
        for on, backend, line in wanted:
            if on:
                trackers.backends.append(backend(cfg, fold, run_dir))
                where[backend] = line
    except BaseException as err:
        trackers.close(err)
        raise
    trackers.connect()
    if trackers.backends:
        log(f"tracking fold {fold} from its first checkpoint on: "
            f"{'; '.join(where[type(backend)] for backend in trackers.backends)}")
    return trackers
