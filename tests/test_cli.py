"""The first hour of a new user: a misspelt make variable or option is refused in one line with the nearest name
before any work, `make -n` shows the command as it runs, `hcd-kit --help` reads as a tool's help, and `config show`
prints the config a run would use."""

import argparse
import os
import re
import subprocess

import pytest
import yaml

from kit.cli import main
from kit.cli_parser import build_parser
from kit.config import CONFIGS_DIR

from conftest import REPO

# the targets `make -n` can show without a prerequisite that does work (all but help's own and the test targets)
EXPERIMENT_TARGETS = ("cache", "config", "train", "train-all", "predict", "submit", "kaggle-run", "report")


def make(*words: str, **environment: str) -> subprocess.CompletedProcess:
    """`make -n …` in the checkout: prints the recipes, runs none. A parent make's flags are left out."""
    env = {name: value for name, value in os.environ.items() if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-n", "--no-print-directory", *words], cwd=REPO, capture_output=True, text=True,
                          env={**env, **environment}, timeout=60)


def kit_command(shown: subprocess.CompletedProcess, command: str) -> str:
    (line,) = [line for line in shown.stdout.splitlines() if f" -m kit {command}" in line]
    return line


# ---------------------------------------------------------------------------------------------------------------
# make: each target's variables
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, given, nearest", [
    ("train", "FOLDS=2", "FOLD"), ("train", "fold=2", "FOLD"), ("train", "EPOCH=3", "EPOCHS"),
    ("train-all", "parallel=2", "PARALLEL"), ("predict", "EXP=a", "EXPS"), ("results", "FOLD=2", "FOLDS"),
])
def test_a_misspelt_make_variable_is_refused_in_one_line_with_the_nearest_before_any_work(target, given, nearest):
    shown = make(target, given)
    name = given.split("=")[0]
    assert shown.returncode == 2 and shown.stdout == "", shown.stdout     # nothing run, not even the venv build
    (line,) = shown.stderr.strip().splitlines()
    assert f"{name} is not a variable of `make {target}`; did you mean {nearest}?" in line, line


def test_a_variable_of_another_target_names_the_target_that_takes_it():
    shown = make("train", "PARALLEL=2")
    assert shown.returncode == 2 and "PARALLEL is not a variable of `make train`; it is a variable of " \
                                     "`make train-all`" in shown.stderr, shown.stderr


def test_several_wrong_variables_are_named_in_one_line():
    shown = make("train", "FOLDS=2", "EPOCH=3")
    (line,) = shown.stderr.strip().splitlines()
    assert shown.returncode == 2 and "FOLDS (did you mean FOLD?), EPOCH (did you mean EPOCHS?) are not variables" \
                                     in line, line


def test_the_right_variables_pass_and_reach_the_command_line():
    shown = make("train", "FOLD=2", "EPOCHS=3", "ARGS=batch_size=8", "PYTHON=python3")
    assert shown.returncode == 0, shown.stderr
    assert kit_command(shown, "train") == (".venv/bin/python -m kit train --fold 2 --config configs/baseline_bn.yaml "
                                           "epochs=3 batch_size=8")
    assert make("results", "FOLDS=2", "SEEDS=1").returncode == 0
    assert make("gpu-check", "QUICK=1", "PY=python3").returncode == 0


def test_variables_from_the_environment_and_makes_own_are_not_refused():
    shown = make("train", FOLDS="2", fold="3", EPOCH="1")
    assert shown.returncode == 0, shown.stderr
    assert "--fold 0" in kit_command(shown, "train")
    assert make("train", "MAKEFLAGS=-s").returncode == 0


@pytest.mark.parametrize("given", ["EPOCHS=abc", "FOLD=x", "FOLD=", "EPOCHS=2.5", "NPROC=-1"])
def test_a_count_that_is_not_a_whole_number_is_refused_naming_the_make_variable(given):
    shown = make("train", given)
    (line,) = shown.stderr.strip().splitlines()
    assert shown.returncode == 2 and shown.stdout == "" and f"{given} must be a whole number" in line, line


@pytest.mark.parametrize("target", [*EXPERIMENT_TARGETS, "demo", "demo-data", "bench", "gpu-check", "results"])
def test_make_n_shows_each_command_on_one_line_without_stray_continuations(target):
    shown = make(target)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line for line in lines if " -m kit " in line], shown.stdout
    assert not [line for line in lines if line.rstrip().endswith("\\")], shown.stdout
    assert not [line for line in lines if " -m kit " in line and line != " ".join(line.split())], shown.stdout


def test_every_target_has_its_variable_list_and_the_header_names_every_variable():
    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)$", makefile, re.M).group(1).replace("\\\n", " ").split()
    listed = set(re.findall(r"^VARS_([a-z-]+) :=", makefile, re.M))
    assert set(phony) <= listed, f"targets without a VARS_ list: {sorted(set(phony) - listed)}"
    header = makefile[makefile.index("# Variables:"):makefile.index("\n\n", makefile.index("# Variables:"))]
    taken = set(re.findall(r"\b[A-Z][A-Z_]+\b", " ".join(re.findall(r"^VARS_\S+ :=(.*)$", makefile, re.M))))
    taken -= {"EXPERIMENT_VARS", "DDP_VARS"}
    assert not {name for name in taken if not re.search(rf"\b{name}\b", header)}, "variables the header leaves out"


def test_make_config_shows_the_config_command_with_the_overrides():
    shown = make("config", "CONFIG=configs/demo.yaml", "ARGS=epochs=7 optimizer.lr=0.001")
    assert kit_command(shown, "config") == (".venv/bin/python -m kit config show --config configs/demo.yaml "
                                            "epochs=7 optimizer.lr=0.001")


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------

def one_line_exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("argv, said", [
    (["train", "--fodl", "2"], "unknown option --fodl; did you mean --fold?"),
    (["train", "--fold", "0", "--forse"], "unknown option --forse; did you mean --force?"),
    (["config", "show", "--conf", "demo"], "unknown option --conf; did you mean --config?"),     # no abbreviations
    (["trian"], "invalid choice: 'trian'"),
    (["predict", "--blend", "rnak"], "did you mean rank?"),
    (["train", "--fold", "abc"], "argument --fold: invalid int value: 'abc'"),
])
def test_a_wrong_option_is_one_line_with_the_nearest_and_exit_2(argv, said, capsys):
    err = one_line_exit_2(argv, capsys)
    assert err.startswith("error: python -m kit") and said in err, err
    if argv == ["trian"]:
        assert "did you mean train?" in err


def test_a_wrong_epochs_value_names_epochs_and_the_value(capsys):
    assert main(["config", "show", "--config", "demo", "epochs=abc"]) == 2
    assert "`epochs` must be an integer, got 'abc'" in capsys.readouterr().err


def test_help_is_a_tools_help_named_as_invoked_with_examples_and_the_shipped_configs(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/home/me/.local/bin/hcd-kit", "--help"])
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    shown = parser.format_help()
    assert shown.startswith("usage: hcd-kit ") and "Makefile calls" not in shown, shown
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name in commands.choices:
        assert re.search(rf"^    {re.escape(name)} +\S", shown, re.M), f"{name} has no line of its own:\n{shown}"
    for example in ("hcd-kit train-all --config configs/demo.yaml", "hcd-kit predict --config",
                    "hcd-kit report --config", "hcd-kit config show"):
        assert example in shown
    for config in CONFIGS_DIR.glob("*.yaml"):
        assert config.stem in shown
    monkeypatch.setattr("sys.argv", ["/work/kit/__main__.py"])
    assert build_parser().format_help().startswith("usage: python -m kit ")


def test_every_argument_of_every_command_has_help():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [f"{parser.prog} {action.dest}" for parser in parsers(build_parser()) for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert not missing, missing


def test_config_show_prints_the_effective_config_with_the_overrides(capsys):
    assert main(["config", "show", "--config", "demo", "epochs=7", "optimizer.lr=0.00123", "--out", "elsewhere"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["name"], shown["epochs"], shown["optimizer"]["lr"], shown["out_dir"]) == ("demo", 7, 0.00123,
                                                                                          "elsewhere")
    assert shown["batch_size"] == yaml.safe_load((CONFIGS_DIR / "demo.yaml").read_text())["batch_size"]
