"""A time-boxed recipe search (`make tune MINUTES=…`): an Optuna study over a search space declared in YAML
(configs/spaces/), each trial the kit's own fold lifecycle (kit/fold.py) on a few folds under its own experiment name
(`<name>-trial<N>`, so trials never touch the user's runs). Epochs are the pruning resource (successive halving); the
budget is wall time: no trial starts that the finished ones say would not end in the time left. The study is a
journal file in runs/<name>/tune/, so the same call resumes it and several processes (or machines) share it; the best
trial becomes configs/<name>-tuned.yaml. Whether its gain holds beyond seed noise is kit/tune_report.py's `prove`.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from .config import CONFIGS_DIR, Config, apply_overrides, load_config, save_config, to_dict
from .errors import Interrupted, KitError, first_line
from .progress import duration, progress_bar
from .tune_report import flat_values, show_value, tune_dir, write_study_report, write_tuned_config

SPACES_DIR = CONFIGS_DIR / "spaces"
SPEC_FIELDS = {"low", "high", "log", "step", "choices"}
# Keys that say where and on what a run happens, not how it learns: tuning them would compare different things
NOT_TUNABLE = ("name", "data_dir", "out_dir", "cache_dir", "submissions_dir", "device", "folds", "max_train_images",
               "epochs", "log", "tta")
JOURNAL = "study.journal"


class PrunedAtEpoch(Exception):
    """Raised from the fold's epoch hook when the pruner stops a trial (train_fold lets it through)."""


# ----------------------------------------------------------------------------------------------------------------
# The search space
# ----------------------------------------------------------------------------------------------------------------

def space_path_for(cfg: Config, space: str | Path | None) -> Path:
    """The space file: a path, a shipped space's name (configs/spaces/<name>.yaml), or None: the model family's
    default (frozen features, the kit's own CNN, or a timm backbone fine-tuned)."""
    if space is None:
        space = "frozen" if cfg.train.frozen_features else (
            "baseline" if cfg.model.name in ("baseline", "baseline_bn") else "timm")
    for candidate in (Path(space), SPACES_DIR / Path(space).name, SPACES_DIR / f"{Path(space).name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))) or "none"
    raise KitError(f"search space not found: {space} (spaces shipped in {SPACES_DIR}: {shipped})")


def load_space(cfg: Config, path: Path) -> dict[str, dict]:
    """The space file's `config.key: {low, high[, log, step]}` or `{choices: [...]}` entries, each key and every
    bound checked against the config schema (one line naming the key)."""
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise KitError(f"{path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(entries, dict) or not entries:
        raise KitError(f"{path}: expected `config.key: {{low: …, high: …}}` lines (configs/spaces/baseline.yaml "
                       f"is an example)")
    defaults = flat_values(to_dict(cfg))
    return {str(key): _checked_entry(cfg, str(key), spec, defaults, path) for key, spec in entries.items()}


def _checked_entry(cfg: Config, key: str, spec, defaults: dict, path: Path) -> dict:
    where = f"{path}: `{key}`"
    if key.split(".")[0] in NOT_TUNABLE:
        raise KitError(f"{where} says where or on what a trial runs, not how it learns: set it in the config "
                       f"(or as key=value), not in the search space")
    if key not in defaults:
        _check_bound(cfg, key, None, path)            # the schema's own message: unknown key, did you mean …
    if not isinstance(spec, dict) or not (set(spec) <= SPEC_FIELDS) or ("choices" in spec) == ("low" in spec):
        raise KitError(f"{where} must be {{low: …, high: …}} (with log: true or step: … if wanted) or "
                       f"{{choices: [...]}}; got {spec!r}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise KitError(f"{where}: `choices` must be a non-empty list, got {spec['choices']!r}")
        return {"choices": [_check_bound(cfg, key, choice, path) for choice in spec["choices"]]}
    if "high" not in spec:
        raise KitError(f"{where} has `low` but no `high`: give both bounds")
    low, high = (_check_bound(cfg, key, spec[bound], path) for bound in ("low", "high"))
    if isinstance(low, bool) or not isinstance(low, (int, float)):
        raise KitError(f"{where} is not a number ({low!r}): a range needs a numeric key; use `choices` for others")
    if not low < high:
        raise KitError(f"{where}: `low` ({low}) must be below `high` ({high})")
    if spec.get("log") and low <= 0:
        raise KitError(f"{where}: a log scale needs `low` above 0, got {low}")
    is_int = isinstance(defaults[key], int) and not isinstance(defaults[key], bool)
    return {"low": low, "high": high, "log": bool(spec.get("log")), "step": spec.get("step"), "int": is_int}


def _check_bound(cfg: Config, key: str, value, path: Path):
    """The value as the schema reads it, or the schema's one line with the space file named in place of `override`."""
    try:
        return flat_values(to_dict(apply_overrides(cfg, {key: value})))[key]
    except KitError as err:
        message = str(err).removeprefix("override: ")
        raise KitError(f"{path}: {message} (a search space's keys are config keys: docs/CONFIGS.md)") from None


def suggest(trial, space: dict[str, dict]) -> dict:
    """One trial's config overrides, drawn from the space."""
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["int"]:
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec["step"] or 1),
                                            log=spec["log"])
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec["step"],
                                              log=spec["log"])
    return params


def starting_params(cfg: Config, space: dict[str, dict]) -> dict:
    """The starting config's values of the space's keys that lie inside it: trial 0, the one to beat."""
    values = flat_values(to_dict(cfg))
    return {key: values[key] for key, spec in space.items()
            if (values[key] in spec["choices"] if "choices" in spec else spec["low"] <= values[key] <= spec["high"])}


# ----------------------------------------------------------------------------------------------------------------
# The study: a journal file in runs/<name>/tune/ (or a storage shared by several machines)
# ----------------------------------------------------------------------------------------------------------------

def open_storage(cfg: Config, storage: str | None = None):
    """An RDB URL (sqlite:///…, postgresql://…) as Optuna reads it, else a journal file: `storage` as a path, or
    runs/<name>/tune/study.journal. A journal on a shared file system serves several machines."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if storage and "://" in storage:
        return optuna.storages.RDBStorage(storage)
    path = Path(storage) if storage else tune_dir(cfg) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    # an open(O_EXCL) lock, not a symlink: it works on NFS and other shared file systems too
    return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def default_pruner():
    """Successive halving with epochs as the resource: at epochs 1, 3, 9… only the best third of the trials that got
    there go on."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def open_study(cfg: Config, storage=None, pruner=None, seed: int | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)      # the kit says what happens, in its own lines
    return optuna.create_study(study_name=cfg.name, storage=open_storage(cfg, storage), direction="maximize",
                               load_if_exists=True, pruner=pruner or default_pruner(),
                               sampler=optuna.samplers.TPESampler(seed=seed))


def trial_config(cfg: Config, params: dict, number: int) -> Config:
    return apply_overrides(cfg, {**params, "name": f"{cfg.name}-trial{number}"})


def seconds_needed(trials) -> float | None:
    """What the next trial will take, from the finished ones: the mean of the completed (a trial may run to the end),
    else the longest pruned or cut one; None before any has finished."""
    from optuna.trial import TrialState

    timed = [(t.state, t.user_attrs["seconds"]) for t in trials if "seconds" in t.user_attrs]
    complete = [seconds for state, seconds in timed if state == TrialState.COMPLETE]
    if complete:
        return sum(complete) / len(complete)
    return max((seconds for _, seconds in timed), default=None)


def time_for_another(trials, seconds_left: float) -> bool:
    needed = seconds_needed(trials)
    return seconds_left > 0 and (needed is None or needed <= seconds_left)


@contextmanager
def quiet_bars():
    """The trials' epoch bars hidden (TQDM_DISABLE, read by kit/progress.py), so one bar tells the study's time."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def run_trial(trial, cfg: Config, space: dict, folds: tuple[int, ...], clock, log, on_epoch=None) -> float:
    """One trial: the fold lifecycle on each of `folds` under `<name>-trial<N>`; val AUC reported after every epoch
    (step = epochs before it, over the folds), pruned when the pruner says so; the mean OOF AUC over the folds."""
    import optuna

    started, fold_aucs, epoch_of = clock(), [], {"epoch": 0}

    def report(epoch, row, index):
        step = index * cfg.epochs + epoch
        epoch_of["epoch"] = step
        trial.report(row["val_auc"], step)
        if on_epoch is not None:
            on_epoch()
        if trial.should_prune():
            raise PrunedAtEpoch(f"pruned after epoch {epoch} of fold {folds[index]} (val AUC {row['val_auc']:.4f})")

    try:                     # from its first line: a Ctrl-C anywhere in the trial is recorded as its cut
        params = suggest(trial, space)
        trial_cfg = trial_config(cfg, params, trial.number)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("folds", list(folds))
        log(f"trial {trial.number}: " + "  ".join(f"{key}={show_value(value)}" for key, value in params.items()))
        from .fold import train_fold  # torch: only when a trial runs (the command line's --help stays fast)

        for index, fold in enumerate(folds):
            metrics = train_fold(trial_cfg, fold, force=True, log=lambda *_: None,
                                 on_epoch_end=lambda epoch, row, index=index: report(epoch, row, index))
            fold_aucs.append(metrics["oof_auc"])
    except PrunedAtEpoch as why:
        trial.set_user_attr("seconds", clock() - started)
        log(f"trial {trial.number}: {why}")
        raise optuna.TrialPruned(str(why)) from None
    except KeyboardInterrupt:
        trial.set_user_attr("seconds", clock() - started)
        trial.set_user_attr("cut", f"Ctrl-C after {epoch_of['epoch']} epoch(s)")
        raise
    trial.set_user_attr("seconds", clock() - started)
    value = sum(fold_aucs) / len(fold_aucs)
    log(f"trial {trial.number}: OOF AUC {value:.4f} in {duration(clock() - started)}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# tune: the budgeted loop (one process, or N sharing the study)
# ----------------------------------------------------------------------------------------------------------------

def run_trials(cfg: Config, space: dict, folds, seconds: float, storage=None, trials: int | None = None, log=print,
               clock=time.monotonic, pruner=None, worker: int = 0, bar=None) -> int:
    """Start trials while the finished ones say the next fits in `seconds`; return how many this process ran."""
    study = open_study(cfg, storage, pruner, seed=cfg.seed * 1000 + worker + len(study_trials(cfg, storage)))
    deadline, ran = clock() + seconds, 0
    best = {"auc": None}

    def tick():
        if bar is not None:
            bar.n = min(bar.total, round(bar.total - (deadline - clock())))
            bar.set_postfix_str(_postfix(study, best))

    while trials is None or ran < trials:
        if not time_for_another(study.trials, deadline - clock()):
            needed = seconds_needed(study.trials)
            log(f"tune: stopping: {duration(max(0.0, deadline - clock()))} left, a trial takes about "
                f"{duration(needed or 0)}")
            break
        with quiet_bars():     # a KitError in a trial (a bad value) is recorded as FAIL and stops the study
            study.optimize(lambda trial: run_trial(trial, cfg, space, tuple(folds), clock, log, tick), n_trials=1)
        ran += 1
        tick()
    return ran


def study_trials(cfg: Config, storage=None) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return optuna.load_study(study_name=cfg.name, storage=open_storage(cfg, storage)).trials
    except KeyError:
        return []


def _postfix(study, best) -> str:
    try:
        best["auc"] = study.best_value
    except ValueError:
        pass
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    auc = f"best AUC {best['auc']:.4f}" if best["auc"] is not None else "best AUC –"
    return f"{auc}, {len(study.trials)} trials, {pruned} pruned"


def tune(cfg: Config, space_path: str | Path | None, minutes: float, folds=(0,), parallel: int = 1,
         storage: str | None = None, log=print, trials: int | None = None, clock=time.monotonic, pruner=None,
         tuned_dir: str | Path = CONFIGS_DIR) -> dict:
    """Search `minutes` of wall time (resuming the study in runs/<name>/tune/), then write the report and
    <tuned_dir>/<name>-tuned.yaml from the best trial. `trials`: at most this many in this call (split over the
    `parallel` processes); `clock` and `pruner` are injectable (tests)."""
    if minutes < 0 or parallel < 1:
        raise KitError(f"tune: MINUTES must be 0 or more and PARALLEL at least 1, got {minutes} and {parallel}")
    path = space_path_for(cfg, space_path)
    space = load_space(cfg, path)
    for fold in folds:
        if not 0 <= fold < cfg.folds.n_splits:
            raise KitError(f"tune: fold {fold} is not one of the {cfg.folds.n_splits} folds (folds.n_splits); "
                           f"pick folds from 0 to {cfg.folds.n_splits - 1}")
    study = open_study(cfg, storage, pruner)
    if study.trials:
        log(f"tune {cfg.name}: resuming the study in {storage or tune_dir(cfg)} ({len(study.trials)} trials so far)")
    else:
        study.enqueue_trial(starting_params(cfg, space))       # the starting recipe is the first to beat
    log(f"tune {cfg.name}: {len(space)} keys from {path}, folds {list(folds)}, {duration(minutes * 60)} budget, "
        f"{parallel} process(es)")
    started = clock()
    bar = progress_bar(total=max(1, round(minutes * 60)), desc=f"tune {cfg.name}", unit="s")
    try:
        if parallel == 1:
            run_trials(cfg, space, folds, minutes * 60, storage, trials, log, clock, pruner, bar=bar)
        else:
            run_workers(cfg, path, minutes * 60, folds, parallel, storage, trials, bar, clock, pruner)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"tune {cfg.name}: stopped by Ctrl-C; the trial that was running is recorded as cut "
                          f"(failed), the finished ones are kept in {storage or tune_dir(cfg)}: rerun the same "
                          f"command to continue, or with MINUTES=0 to write the report and the tuned config") from None
    bar.close()
    study = open_study(cfg, storage, pruner)
    summary = write_study_report(cfg, study, tune_dir(cfg), clock() - started, path, tuple(folds))
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        summary["tuned_config"] = write_tuned_config(cfg, study, Path(tuned_dir), tuple(folds), path)
        log(f"tune {cfg.name}: best OOF AUC {study.best_value:.4f} (trial {study.best_trial.number} of "
            f"{len(study.trials)}, {summary['pruned']} pruned) → {summary['tuned_config']}; report "
            f"{summary['report']}")
    else:
        log(f"tune {cfg.name}: no trial finished yet; report {summary['report']}")
    return summary


def run_workers(cfg: Config, space_path: Path, seconds: float, folds, parallel: int, storage, trials, bar, clock,
                pruner=None):
    """`parallel` processes, each running trials on the shared study until the budget; the bar follows the study.
    A study's pruner is not stored with it: the workers are told which (successive halving, or none)."""
    import optuna

    folder = tune_dir(cfg)
    config_path = folder / "tune-config.yaml"
    save_config(cfg, config_path)
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    each = None if trials is None else math.ceil(trials / parallel)
    command = [sys.executable, "-m", "kit.tune", str(config_path), str(space_path), str(seconds),
               ",".join(map(str, folds)), storage or "", str(each or 0),
               "none" if isinstance(pruner, optuna.pruners.NopPruner) else "successive-halving"]
    workers = []
    for worker in range(parallel):
        with open(folder / f"worker{worker}.log", "w") as out:
            workers.append(subprocess.Popen([*command, str(worker)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=Path(__file__).resolve().parent.parent))
    deadline = clock() + seconds
    while any(worker.poll() is None for worker in workers):
        time.sleep(1.0)
        bar.n = min(bar.total, round(bar.total - (deadline - clock())))
        bar.set_postfix_str(_postfix(open_study(cfg, storage), {"auc": None}))
    failed = [i for i, worker in enumerate(workers) if worker.returncode not in (0, 130)]
    if failed:
        raise KitError(f"tune: worker {failed[0]} stopped with an error: see {folder / f'worker{failed[0]}.log'}")
    if any(worker.returncode == 130 for worker in workers):
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------------------
# The command line's `tune` and `prove` (kit/cli.py hands over its parser and arguments: it stays wiring only)
# ----------------------------------------------------------------------------------------------------------------

def add_tune_commands(commands, add_experiment_options) -> None:
    """`tune` and `prove` on the command line's subparsers."""
    def folds(text: str) -> tuple[int, ...]:
        return tuple(int(fold) for fold in text.replace(",", " ").split())

    tune_parser = commands.add_parser("tune", help="time-boxed recipe search → configs/<name>-tuned.yaml")
    add_experiment_options(tune_parser)
    tune_parser.add_argument("--minutes", type=float, default=30.0, help="wall-time budget (default %(default)s)")
    tune_parser.add_argument("--space", help="search space: a YAML path or a configs/spaces name (default: the "
                                             "model family's: baseline, timm or frozen)")
    tune_parser.add_argument("--folds", type=folds, default=(0,), help="folds each trial trains, e.g. 0,1 (default 0)")
    tune_parser.add_argument("--parallel", type=int, default=1, help="trial processes at once (default %(default)s)")
    tune_parser.add_argument("--storage", help="a study shared by several machines: a journal file on a shared "
                                               "disk, or an RDB URL (default runs/<name>/tune/study.journal)")
    tune_parser.add_argument("--trials", type=int, help="at most this many trials in this call")
    prove_parser = commands.add_parser("prove", help="tuned vs starting config: every fold × seeds, paired test")
    add_experiment_options(prove_parser)
    prove_parser.add_argument("--tuned", required=True, help="the tuned config (configs/<name>-tuned.yaml)")
    prove_parser.add_argument("--seeds", type=int, default=3, help="seeds, at least 3 (default %(default)s)")


def run_tune_command(args, cfg: Config, load_experiment) -> None:
    """`tune` or `prove` with the experiment loaded; `load_experiment(path)` loads another config with the same
    overrides (the tuned one, for prove)."""
    from .tune_report import prove

    if args.command == "tune":
        tune(cfg, args.space, args.minutes, folds=args.folds, parallel=args.parallel, storage=args.storage,
             trials=args.trials, log=lambda line: print(line, flush=True))
    else:
        result = prove(cfg, load_experiment(args.tuned), seeds=args.seeds, log=lambda line: print(line, flush=True),
                       tuned_path=args.tuned, start_path=args.config)
        print(result["recommended_path"] or result["recommended"])     # the config to train, last


def _worker_main(argv: list[str]) -> int:
    """A `parallel` worker: python -m kit.tune CONFIG SPACE SECONDS FOLDS STORAGE TRIALS PRUNER WORKER; its errors
    as one line and exit 2, Ctrl-C as 130 (the command line's convention)."""
    import optuna

    config, space_path, seconds, folds, storage, trials, pruner, worker = argv
    try:
        cfg = load_config(config)
        run_trials(cfg, load_space(cfg, Path(space_path)), tuple(int(f) for f in folds.split(",")), float(seconds),
                   storage or None, int(trials) or None, lambda line: print(line, flush=True), worker=int(worker),
                   pruner=optuna.pruners.NopPruner() if pruner == "none" else None)
    except KitError as err:
        print(f"error: {err}", flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial is recorded as cut", flush=True)
        return 130
    return 0

if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
