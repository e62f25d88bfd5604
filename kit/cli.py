"""The command line the Makefile calls: `python -m kit <command> --config … --fold … key=value …`.

Only argument parsing and wiring live here; every command is a few calls into the pipeline modules. A KitError
becomes one line on stderr and exit status 2; Ctrl-C says how to resume and exits 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import KitError

DEFAULT_CONFIG = "configs/baseline.yaml"


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML (default %(default)s)")
    parser.add_argument("--data-dir", help="Kaggle data folder (overrides the config's data_dir)")
    parser.add_argument("--out", help="root of run folders (overrides the config's out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="generate a small data set in the Kaggle layout")
    demo.add_argument("--out", default="data/demo", help="folder to write (default %(default)s)")
    demo.add_argument("--train", type=int, default=1500, help="training patches (default %(default)s)")
    demo.add_argument("--test", type=int, default=400, help="test patches (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")

    cache = commands.add_parser("cache", help="decode every TIFF once into the uint8 cache")
    _add_experiment_options(cache)

    train = commands.add_parser("train", help="train one fold (resumes an interrupted one)")
    _add_experiment_options(train)
    train.add_argument("--fold", type=int, required=True)
    train.add_argument("--force", action="store_true", help="retrain even if the fold is finished")

    train_all = commands.add_parser("train-all", help="train every fold of the experiment")
    _add_experiment_options(train_all)
    train_all.add_argument("--force", action="store_true", help="retrain folds that are finished")

    predict = commands.add_parser("predict", help="fold ensemble × TTA → submissions/<experiment>-<time>.csv")
    _add_experiment_options(predict)
    predict.add_argument("--allow-missing-folds", action="store_true",
                         help="predict with the finished folds when some are missing")

    submit = commands.add_parser("submit", help="validate a submission CSV, then upload it to Kaggle")
    _add_experiment_options(submit)
    submit.add_argument("--file", required=True, help="the CSV written by `predict`")
    submit.add_argument("--message", help="submission description (default: experiment and CV AUC)")
    submit.add_argument("--dry-run", action="store_true", help="validate only; send nothing")
    return parser


def load_experiment(args):
    from .config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.out:
        overrides["out_dir"] = args.out
    return load_config(args.config, overrides)


def run(args) -> None:
    if args.command == "demo-data":
        from .demo_data import make_demo_data, demo_data_is_complete

        if not args.force and demo_data_is_complete(args.out, args.train, args.test):
            print(f"demo data already in {args.out} ({args.train} train / {args.test} test patches)")
            return
        make_demo_data(args.out, n_train=args.train, n_test=args.test, seed=args.seed)
        print(f"demo data written to {args.out}: {args.train} train / {args.test} test patches")
        return

    cfg = load_experiment(args)

    if args.command == "cache":
        from .data import cache_dir_for, check_data_dir, load_split_images, read_sample_submission, read_train_labels

        data_dir = check_data_dir(cfg.data_dir)
        cache_dir = cache_dir_for(cfg.out_dir, data_dir)
        for split, ids in (("train", read_train_labels(data_dir)["id"]), ("test", read_sample_submission(data_dir)["id"])):
            images = load_split_images(data_dir, split, ids, cache_dir)
            print(f"{split}: {len(images):,} images cached in {cache_dir}")

    elif args.command == "train":
        from .engine import train_fold

        train_fold(cfg, args.fold, force=args.force)

    elif args.command == "train-all":
        from .engine import train_fold

        for fold in range(cfg.folds.n_splits):
            train_fold(cfg, fold, force=args.force)

    elif args.command == "predict":
        from .data import read_sample_submission
        from .predict import predict_test
        from .submission import build_submission, submission_path, write_submission

        prediction = predict_test(cfg, allow_missing_folds=args.allow_missing_folds)
        sample = read_sample_submission(cfg.data_dir)
        details = {"experiment": cfg.name, "cv_auc": prediction.cv_auc,
                   "folds": [c.fold for c in prediction.folds], "tta": prediction.views,
                   "sample_submission": str(Path(cfg.data_dir).resolve() / "sample_submission.csv")}
        path = write_submission(build_submission(prediction.ids, prediction.probabilities, sample),
                                submission_path(cfg.submissions_dir, cfg.name), sample, details)
        print(f"submission validated against sample_submission.csv ({len(sample):,} rows)")
        print(path)

    elif args.command == "submit":
        from .data import read_sample_submission
        from .submission import default_message, read_submission_details, submit

        if not args.file:
            raise KitError("say which file to submit: make submit FILE=submissions/<experiment>-<time>.csv")
        details = read_submission_details(args.file)
        # the sample_submission the file was made against, unless DATA_DIR says otherwise
        sample_source = args.data_dir or details.get("sample_submission") or cfg.data_dir
        submit(args.file, read_sample_submission(sample_source), args.message or default_message(details, args.file),
               dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except KitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished epochs are saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
