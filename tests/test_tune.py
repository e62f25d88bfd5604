"""The recipe search (kit/tune.py, kit/tune_report.py): a budget it keeps, trials it prunes, a journal it resumes and
shares, a tuned config that loads, one-line errors, a Ctrl-C'd trial recorded as cut, and prove's paired test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pandas as pd
import pytest

import kit.config
import kit.fold
from kit.config import load_config
from kit.demo_data import make_demo_data
from kit.errors import KitError
from kit.tune import open_study, time_for_another, tune
from kit.tune_report import paired_gain, prove, tune_dir

from conftest import REPO, as_from_a_terminal


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("data") / "tiny", n_train=160, n_test=16, seed=1)


@pytest.fixture
def tiny_config(tiny_data, tmp_path, shared_cache_dir):
    """2 folds, 32 training patches a fold, no TTA: a trial is seconds on 2 cores."""
    def make(**overrides):
        values = {"data_dir": str(tiny_data), "out_dir": str(tmp_path / "runs"), "cache_dir": str(shared_cache_dir),
                  "epochs": 2, "batch_size": 32, "eval_batch_size": 128, "folds.n_splits": 2, "tta.views": "none",
                  "max_train_images": 32, "device": "cpu"}
        return load_config(REPO / "configs" / "demo.yaml", {**values, **overrides})
    return make


@pytest.fixture
def lr_space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\nloss.label_smoothing: {low: 0, high: 0.1}\n"
                    "optimizer.name: {choices: [adam, adamw]}\n")
    return path


class FakeClock:
    """The study's time source, moved by the test: each fold trained takes `per_fold` seconds of it."""

    def __init__(self, per_fold: float):
        self.now, self.per_fold = 0.0, per_fold

    def __call__(self) -> float:
        return self.now


def test_a_study_starts_no_trial_that_would_not_end_within_the_budget(tiny_config, lr_space, tmp_path, monkeypatch):
    clock = FakeClock(per_fold=40.0)
    real_train_fold = kit.fold.train_fold

    def train_fold_taking_40_seconds(*args, **kwargs):
        metrics = real_train_fold(*args, **kwargs)
        clock.now += clock.per_fold
        return metrics

    monkeypatch.setattr(kit.fold, "train_fold", train_fold_taking_40_seconds)
    cfg = tiny_config(epochs=1)
    summary = tune(cfg, lr_space, minutes=100 / 60, clock=clock, trials=5, pruner=optuna.pruners.NopPruner(),
                   tuned_dir=tmp_path, log=lambda *_: None)
    # trial 0 ends at 40 s, trial 1 at 80 s; 20 s left < the 40 s a trial takes: no third
    assert summary["trials"] == 2 and clock.now == 80.0
    assert summary["minutes_in_trials"] == pytest.approx(80 / 60)


def test_the_budget_estimate_comes_from_the_finished_trials():
    complete = optuna.trial.create_trial(value=0.9, state=optuna.trial.TrialState.COMPLETE, user_attrs={"seconds": 30})
    assert time_for_another([], 1.0)
    assert time_for_another([complete], 30.0) and not time_for_another([complete], 29.0)
    assert not time_for_another([], 0.0)


def test_a_trial_the_pruner_stops_ends_its_fold_after_that_epoch(tiny_config, lr_space, tmp_path):
    cfg = tiny_config(epochs=3)
    summary = tune(cfg, lr_space, minutes=10, trials=1, pruner=optuna.pruners.ThresholdPruner(lower=1.01),
                   tuned_dir=tmp_path, log=lambda *_: None)       # any AUC is below 1.01: pruned at epoch 1
    (trial,) = open_study(cfg).trials
    assert trial.state == optuna.trial.TrialState.PRUNED and summary["pruned"] == 1
    assert list(trial.intermediate_values) == [1]
    assert trial.params == {"optimizer.lr": 1e-3, "loss.label_smoothing": 0.0, "optimizer.name": "adam"}  # the start
    history = pd.read_csv(tmp_path / "runs" / "demo-trial0" / "fold0" / "history.csv")
    assert list(history["epoch"]) == [1]                    # the fold stopped there, 2 of its 3 epochs not trained
    assert (tmp_path / "runs" / "demo-trial0" / "fold0" / "last.pt").is_file()      # kept, as docs/TUNE.md says
    assert "tuned_config" not in summary and (tune_dir(cfg) / "tune.md").is_file()


def test_the_same_call_resumes_the_study_and_the_best_trial_becomes_a_loadable_config(tiny_config, tmp_path):
    space = tmp_path / "space.yaml"        # the starting lr (1e-3) and smoothing (0) lie outside: every trial differs
    space.write_text("optimizer.lr: {low: 2.0e-3, high: 5.0e-3, log: true}\nloss.label_smoothing: {low: 0.01, "
                     "high: 0.1}\noptimizer.name: {choices: [adam, adamw]}\n")
    cfg, lines = tiny_config(epochs=1), []
    options = dict(minutes=10, trials=1, pruner=optuna.pruners.NopPruner(), tuned_dir=tmp_path, log=lines.append)
    tune(cfg, space, **options)
    summary = tune(cfg, space, **options)
    study = open_study(cfg)
    assert [t.number for t in study.trials] == [0, 1] and summary["trials"] == 2
    assert any("resuming the study" in line and "1 trials so far" in line for line in lines)
    # trial 0 holds the starting values that lie inside the space (optimizer.name: adam), the rest drawn
    assert study.trials[0].params["optimizer.name"] == "adam"
    tuned = load_config(summary["tuned_config"])
    assert tuned.name == "demo-tuned" and tuned.optimizer.lr != cfg.optimizer.lr
    best = study.best_trial.params
    assert (tuned.optimizer.lr, tuned.loss.label_smoothing, tuned.optimizer.name) == (
        best["optimizer.lr"], best["loss.label_smoothing"], best["optimizer.name"])
    assert summary["tuned_config"].read_text().startswith("# Tuned from experiment `demo`")
    assert not (tmp_path / "runs" / "demo" / "fold0").exists()        # trials never touch the experiment's runs
    assert (tmp_path / "runs" / "demo-trial1" / "fold0" / "metrics.json").is_file()


def test_two_processes_share_one_journal_study(tiny_config, lr_space, tmp_path):
    cfg = tiny_config(epochs=1)
    tune(cfg, lr_space, minutes=10, parallel=2, trials=2, pruner=optuna.pruners.NopPruner(), tuned_dir=tmp_path,
         log=lambda *_: None)
    trials = open_study(cfg).trials
    assert sorted(t.number for t in trials) == [0, 1]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2          # one trial from each process


@pytest.mark.parametrize("entry, expected", [
    ("optimizer.lrr: {low: 1.0e-4, high: 1.0e-2}", "unknown config key `optimizer.lrr`; did you mean optimizer.lr?"),
    ("optimizer.lr: {low: 1.0e-2, high: 1.0e-4}", "`optimizer.lr`: `low` (0.01) must be below `high`"),
    ("optimizer.lr: {low: 0, high: 1.0e-2, log: true}", "`optimizer.lr` must be greater than 0"),
    ("optimizer.name: {choices: [adam, lion]}", "`optimizer.name` must be one of adam, adamw, sgd, got 'lion'"),
    ("optimizer.lr: {lo: 1.0e-4, high: 1.0e-2}", "`optimizer.lr` must be {low: …, high: …}"),
    ("epochs: {low: 1, high: 9}", "`epochs` says where or on what a trial runs"),
])
def test_a_bad_space_entry_is_one_line_naming_the_key(tiny_config, tmp_path, entry, expected):
    path = tmp_path / "space.yaml"
    path.write_text(entry + "\n")
    with pytest.raises(KitError) as err:
        tune(tiny_config(), path, minutes=1, log=lambda *_: None, tuned_dir=tmp_path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()                 # refused before any study or training


def test_a_trial_cut_by_ctrl_c_is_recorded_as_cut_and_the_study_says_so_in_one_line(tiny_data, lr_space, tmp_path):
    overrides = {"data_dir": str(tiny_data), "out_dir": str(tmp_path / "runs"), "epochs": 50, "batch_size": 32,
                 "folds.n_splits": 2, "tta.views": "none", "max_train_images": 32, "device": "cpu"}
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    script = textwrap.dedent(f"""
        import sys
        from kit.cli import run_reporting_errors
        from kit.config import load_config
        from kit.tune import tune
        cfg = load_config({str(REPO / "configs" / "demo.yaml")!r}, {overrides!r})
        sys.exit(run_reporting_errors(lambda: tune(cfg, {str(lr_space)!r}, minutes=10, tuned_dir={str(tmp_path)!r},
                                                   log=lambda line: print(line, flush=True))))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=as_from_a_terminal, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in child.stdout:                  # the trial has started: its parameters are logged
        if line.startswith("trial 0:"):
            break
    time.sleep(2.0)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130
    assert stderr.strip().splitlines() == [stderr.strip()] and "recorded as cut" in stderr
    (trial,) = open_study(cfg).trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["cut"].startswith("Ctrl-C after")


def test_the_paired_test_tells_a_steady_gain_from_seed_noise():
    steady = paired_gain([0.90, 0.91, 0.92], [0.93, 0.945, 0.95])
    assert steady["holds"] and steady["std"] == pytest.approx(0.0028867, rel=1e-4)     # sample std (n - 1)
    noisy = paired_gain([0.90, 0.91, 0.92], [0.95, 0.89, 0.93])
    assert not noisy["holds"] and noisy["mean"] > 0
    assert not paired_gain([0.9] * 3, [0.9] * 3)["holds"]


def test_prove_keeps_the_starting_config_when_the_tuned_one_gains_nothing(tiny_config, tmp_path):
    cfg = tiny_config(epochs=1)
    same_recipe = kit.config.apply_overrides(cfg, {"name": "demo-tuned"})
    result = prove(cfg, same_recipe, seeds=3, log=lambda *_: None)
    assert len(result["start"]) == 3 and result["differences"] == [0.0, 0.0, 0.0]
    assert not result["holds"] and result["recommended"] == "demo" and "keep `demo`" in result["verdict"]
    assert (tmp_path / "runs" / "demo-tuned-seed44" / "fold1" / "metrics.json").is_file()
    with pytest.raises(KitError, match="SEEDS=2 is too few"):
        prove(cfg, same_recipe, seeds=2)


def test_the_command_line_reads_tune_and_prove_arguments():
    from kit.cli_parser import KitArgumentParser, _add_experiment_options
    from kit.tune import add_tune_commands

    parser = KitArgumentParser(prog="kit")
    add_tune_commands(parser.add_subparsers(dest="command", required=True), _add_experiment_options)
    args = parser.parse_args(["tune", "--minutes", "5", "--folds", "0,2", "--parallel", "2", "epochs=3"])
    assert (args.minutes, args.folds, args.parallel, args.overrides) == (5.0, (0, 2), 2, ["epochs=3"])
    args = parser.parse_args(["prove", "--tuned", "configs/demo-tuned.yaml"])
    assert (args.tuned, args.seeds) == ("configs/demo-tuned.yaml", 3)


def test_each_model_family_gets_its_shipped_space_and_every_shipped_space_loads(tiny_config):
    from kit.tune import load_space, space_path_for

    cfg = tiny_config()
    assert space_path_for(cfg, None).name == "baseline.yaml"
    assert space_path_for(kit.config.apply_overrides(cfg, {"model.name": "efficientnet_b0"}), None).name == "timm.yaml"
    assert space_path_for(kit.config.apply_overrides(cfg, {"train.frozen_features": True}), None).name == "frozen.yaml"
    for name in ("baseline", "timm", "frozen"):
        assert load_space(cfg, space_path_for(cfg, name))
