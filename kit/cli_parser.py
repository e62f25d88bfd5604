"""The command line's grammar: `hcd-kit`'s commands, their options with help, and argparse's errors as the kit's
(one line naming the argument and the nearest valid name, exit 2). kit/cli.py runs what it parses.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from pathlib import Path

DEFAULT_CONFIG = "configs/baseline_bn.yaml"
DESCRIPTION = ("Kaggle's Histopathologic Cancer Detection: train k-fold CNNs, predict with TTA, report, submit. "
               "Each make target calls one of these commands (`make help`).")


def invoked_as() -> str:
    """The name to show in usage lines: `hcd-kit` when run as the installed script, else `python -m kit`."""
    return "hcd-kit" if Path(sys.argv[0]).name == "hcd-kit" else "python -m kit"


def did_you_mean(word: str, names) -> str:
    """"; did you mean X?" for the nearest of `names` (any case), or "" when none is near."""
    by_folded = {str(name).casefold(): str(name) for name in names}
    close = difflib.get_close_matches(word.casefold(), list(by_folded), n=1, cutoff=0.6)
    return f"; did you mean {by_folded[close[0]]}?" if close else ""


class KitArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as the kit's: one line naming the argument and the nearest valid name, exit 2.
    Options are taken whole (`--devic` is refused with its nearest, not read as `--device`)."""

    def __init__(self, *args, **options):
        options.setdefault("allow_abbrev", False)
        super().__init__(*args, **options)

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)     # for error(): the words this parser read
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = [word for word in getattr(self, "given", ())
                   if word.startswith("--") and word.split("=", 1)[0] not in self._option_string_actions]
        if unknown and message.startswith("the following arguments are required"):
            self.unknown_arguments(unknown)        # `--fodl 2`: the typo, not the --fold it left out
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        hint = did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2))) if choice else ""
        self.exit(2, f"error: {self.prog}: {message}{hint} (see `{self.prog} --help`)\n")

    def unknown_arguments(self, extra: list[str]):
        """Refuse what argparse left over: an unknown option with its nearest, else the stray words."""
        options = [option for option in extra if option.startswith("-")]
        if options:
            flag = options[0].split("=", 1)[0]
            known = [name for name in self._option_string_actions if name.startswith("--")]
            self.exit(2, f"error: {self.prog}: unknown option {flag}{did_you_mean(flag, known)} "
                         f"(see `{self.prog} --help`)\n")
        self.error(f"unrecognized arguments: {' '.join(extra)}")


def epilog(prog: str) -> str:
    """`--help`'s end: examples, and the configs shipped with the kit (by name from any folder)."""
    from .config import CONFIGS_DIR

    examples = [
        ("every fold of an experiment, then its CV AUC", "train-all --config configs/demo.yaml"),
        ("one fold, with a config override", "train --config configs/demo.yaml --fold 2 epochs=3"),
        ("folds × TTA → submissions/demo-<time>.csv", "predict --config configs/demo.yaml"),
        ("OOF metrics, thresholds, figures → runs/demo/report.md", "report --config configs/demo.yaml"),
        ("the effective config, as YAML", "config show --config demo optimizer.lr=3e-4"),
        ("a command's options", "train --help"),
    ]
    lines = ["examples:"] + [line for what, command in examples for line in (f"  # {what}", f"  {prog} {command}")]
    shipped = textwrap.wrap(", ".join(sorted(path.stem for path in CONFIGS_DIR.glob("*.yaml"))) or "none", width=76)
    return "\n".join([*lines, "", f"shipped configs (--config NAME, or a path; {CONFIGS_DIR}):",
                      *(f"  {line}" for line in shipped)])


class HelpFormatter(argparse.HelpFormatter):
    """Each command's help on one line beside its name; the epilog's indented lines kept as written."""

    def __init__(self, prog, **options):
        super().__init__(prog, max_help_position=19, **options)
        self._action_max_length = 17        # the help column past the longest command (`    submissions  `)

    def _fill_text(self, text, width, indent):
        return "\n".join(indent + line if line.startswith(" ") or not line else
                         textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default %(default)s)")
    parser.add_argument("--data-dir", help="Kaggle data folder (overrides the config's data_dir)")
    parser.add_argument("--out", help="root of run folders (overrides the config's out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3")


def build_parser(prog: str | None = None) -> KitArgumentParser:
    prog = prog or invoked_as()
    parser = KitArgumentParser(prog=prog, description=DESCRIPTION, epilog=epilog(prog), formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="<command>")

    demo = commands.add_parser("demo-data", help="generate a small data set in the Kaggle layout")
    demo.add_argument("--difficulty", default="easy", choices=("easy", "hard"),
                      help="easy: the demo, every recipe ≈ 1.0; hard: slides with their own stain, blur and noise, "
                           "subtle tumour, hard negatives, noisy labels (default %(default)s)")
    demo.add_argument("--out", help="folder to write (default data/demo, or data/hard)")
    demo.add_argument("--train", type=int, help="training patches (default 1500, hard 3000)")
    demo.add_argument("--test", type=int, help="test patches (default 400, hard 1000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the generated set (default %(default)s)")
    demo.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")

    cache = commands.add_parser("cache", help="decode every TIFF once into the uint8 cache")
    _add_experiment_options(cache)

    config = commands.add_parser("config", help="the effective config (`config show`)")
    config_actions = config.add_subparsers(dest="action", required=True, title="actions", metavar="<action>")
    show = config_actions.add_parser("show", help="print the config with the overrides applied, as YAML",
                                     description="Print the config a command would run with (defaults ← --config "
                                                 "← --data-dir/--out ← key=value), as YAML it can be saved as.")
    _add_experiment_options(show)

    train = commands.add_parser("train", help="train one fold (resumes an interrupted one)")
    _add_experiment_options(train)
    train.add_argument("--fold", type=int, required=True, help="which fold: 0 … folds.n_splits - 1")
    train.add_argument("--force", action="store_true", help="retrain even if the fold is finished")

    train_all = commands.add_parser("train-all", help="train every fold of the experiment")
    _add_experiment_options(train_all)
    train_all.add_argument("--force", action="store_true", help="retrain folds that are finished")
    train_all.add_argument("--parallel", default="1", help="folds trained at once, one process each: a number, or "
                                                           "auto = one per GPU (default %(default)s)")

    predict = commands.add_parser("predict", help="folds × TTA → submissions/<experiment>-<time>.csv")
    _add_experiment_options(predict)
    predict.add_argument("--allow-missing-folds", action="store_true",
                         help="predict with the finished folds when some are missing")
    predict.add_argument("--exps", default="", help="blend several experiments (config names or paths, space- or "
                                                    "comma-separated) instead of --config")
    predict.add_argument("--blend", default="mean", choices=("mean", "rank"),
                         help="with --exps: weighted mean of probabilities or of ranks (default %(default)s)")

    submit = commands.add_parser("submit", help="validate a submission CSV, then upload it to Kaggle")
    _add_experiment_options(submit)
    submit.add_argument("--file", default="", help="the CSV written by `predict`; checked against the "
                                                   "sample_submission.csv it was predicted from, else --data-dir's, "
                                                   "else the config's")
    submit.add_argument("--message", help="submission description (default: experiment and CV AUC)")
    submit.add_argument("--dry-run", action="store_true", help="validate only; send nothing")
    submit.add_argument("--force", action="store_true", help="upload even when the rows are not the competition's "
                                                             "57,458 test ids (e.g. a prediction of the demo data)")

    data = commands.add_parser("data", help="download, unzip and verify the competition data")
    data.add_argument("--data-dir", default="data", help="where to put it (default %(default)s)")

    commands.add_parser("submissions", help="recent submissions, their status and public score")

    bench = commands.add_parser("bench", help="images/s from files to the model on this machine")
    bench.add_argument("--out", default="runs/bench", help="folder for bench-<time>.json (default %(default)s)")
    bench.add_argument("--images", type=int, default=4096, help="generated patches (default %(default)s)")
    bench.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where to time the model (default %(default)s: cuda when there is one)")
    bench.add_argument("--batch-size", type=int, default=256, help="(default %(default)s)")
    bench.add_argument("--timm-model", default="resnet18", help="the timm model timed (default %(default)s)")
    bench.add_argument("--seconds", type=float, default=2.0, help="least time per measurement (default %(default)s)")

    gpu_check = commands.add_parser("gpu-check", help="prove the GPU path on this card within --minutes",
                                    description="Prove the GPU path on this card: bench, one epoch per config under "
                                                "sync-debug, both precisions, compile, TTA.")
    gpu_check.add_argument("--out", default="runs/gpu-check", help="folder for gpu-check-<time>.json "
                                                                  "(default %(default)s)")
    gpu_check.add_argument("--images", type=int, default=None, help="generated patches (default 50000; --quick 2000)")
    gpu_check.add_argument("--minutes", type=float, default=7.0,
                           help="time budget: rows that would not fit are skipped, in order of least value "
                                "(default %(default)s)")
    gpu_check.add_argument("--configs", default="", help="shipped configs to run (space- or comma-separated; "
                                                          "default all)")
    gpu_check.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    gpu_check.add_argument("--no-checks", action="store_true", help="leave out the correctness checks "
                           "(kit/gpu_correctness.py; they run on a GPU only)")
    gpu_check.add_argument("--quick", action="store_true", help="small sizes (2,000 patches, baseline_bn only unless "
                                                                "--configs): the same steps in a minute or two")
    gpu_check.add_argument("--rows", default="", help="only print the table of a check's gpu-check-<time>.jsonl "
                                                      "(one cut off before its end included)")
    gpu_check.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                           help="cpu runs the same steps on the CPU (default %(default)s)")

    results = commands.add_parser("results", help="configs × seeds on the hard generated set → docs/RESULTS.md")
    results.add_argument("--configs", default="baseline baseline_bn effnet_b0 resnet34 convnext_nano",
                         help="shipped configs, or lite0_imagenet / lite0_random (default: %(default)s)")
    results.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per config (default %(default)s)")
    results.add_argument("--folds", type=int, default=0, help="train only the first N folds (default: all)")
    results.add_argument("--out", help="folder of the raw rows (results.jsonl) and the study's runs (default "
                                       "runs/results under the current folder)")
    results.add_argument("--page", help="the results page to write (default docs/RESULTS.md under the current "
                                        "folder)")
    results.add_argument("--rewrite", action="store_true",
                         help="only rewrite the page from the stored rows (results.jsonl and the page's own)")
    results.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")

    bundle = commands.add_parser("bundle", help="zip the kit and its wheels for a Kaggle dataset")
    bundle.add_argument("--out", default="dist/hcd-kit.zip", help="zip to write (default %(default)s)")

    kaggle_run = commands.add_parser("kaggle-run", help="train and predict on Kaggle's GPUs from here",
                                     description="Train and predict on Kaggle's GPUs: push the bundle and the "
                                                 "notebook, follow it, download its outputs.")
    _add_experiment_options(kaggle_run)
    kaggle_run.add_argument("--accelerator", default="NvidiaTeslaT4",
                            help="Kaggle accelerator (default %(default)s; NvidiaL4 for bf16)")
    kaggle_run.add_argument("--submit", action="store_true", help="submit the downloaded CSV as `make submit` does")
    kaggle_run.add_argument("--force", action="store_true", help="push a new kernel even if one was pushed before")

    report = commands.add_parser("report", help="OOF metrics, thresholds, figures → report.md",
                                description="OOF metrics, thresholds and figures → runs/<experiment>/report.md.")
    _add_experiment_options(report)
    report.add_argument("--exps", default="", help="several experiments (config names or paths, space- or "
                                                   "comma-separated) side by side, instead of --config")
    report.add_argument("--target-sensitivity", type=float, default=0.95,
                        help="sensitivity the third threshold must reach (default %(default)s)")
    report.add_argument("--saliency-images", type=int, default=None, metavar="N",
                        help="validation patches per fold behind the centre evidence share (default 64; 0: no maps)")
    from .tune import add_tune_commands  # optuna loads only for `tune` and `prove`

    add_tune_commands(commands, _add_experiment_options)
    for listed in commands._choices_actions:          # `<command> --help` opens with the line `--help` lists
        commands.choices[listed.dest].description = commands.choices[listed.dest].description or listed.help
    return parser


def command_parser(parser: argparse.ArgumentParser, args) -> KitArgumentParser:
    """The parser of the (sub)command `args` came from (`config show`'s for `config show`), for its options."""
    for name in ("command", "action"):
        actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
        if not actions or getattr(args, name, None) not in actions[0].choices:
            break
        parser = actions[0].choices[getattr(args, name)]
    return parser
