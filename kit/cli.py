"""The kit's command line, `hcd-kit` (or `python -m kit`): `hcd-kit <command> --config … key=value …`.

Every make target is one call of it. Only wiring lives here (the grammar is kit/cli_parser.py); every command is a
few calls into the pipeline modules. A KitError, or an OS error (disk full, read-only, a file where a folder should be), becomes one line on stderr and exit status 2;
Ctrl-C says what was and was not saved at that stage and exits 130.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .cli_parser import build_parser, command_parser
from .errors import Interrupted, KitError, SharedError
from .progress import say


def load_experiment(args, config: str | None = None):
    from .api import load_config
    from .config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.out:
        overrides["out_dir"] = args.out
    return load_config(config or args.config, overrides)


def run(args) -> None:
    from . import api

    if args.command == "demo-data":
        api.make_demo_data(args.out, n_train=args.train, n_test=args.test, seed=args.seed, force=args.force,
                           difficulty=args.difficulty)
    elif args.command == "data":
        api.download_data(args.data_dir)
    elif args.command == "submissions":
        api.list_submissions()
    elif args.command == "bench":
        print(api.bench(args.out, images=args.images, device=args.device, batch_size=args.batch_size,
                        timm_model=args.timm_model, min_seconds=args.seconds))     # the JSON's path, last
    elif args.command == "gpu-check":
        from .gpu_check import COMPILED, QUICK, SHIPPED, run_gpu_check
        from .gpu_report import format_report, read_rows, summary

        if args.rows:
            if not Path(args.rows).is_file():
                raise KitError(f"gpu-check --rows: {args.rows} not found")
            print(format_report(summary(read_rows(Path(args.rows)))))
            return
        options = dict(QUICK) if args.quick else {}
        if args.images:
            options["images"] = args.images
        names = args.configs.replace(",", " ").split()
        unknown = [name for name in names if name not in SHIPPED]
        if unknown:
            raise KitError(f"gpu-check --configs: {', '.join(unknown)} not shipped (configs: {', '.join(SHIPPED)})")
        configs = tuple(names) or (("baseline_bn",) if args.quick else SHIPPED)
        path, passed = run_gpu_check(args.out, configs=configs, compiled=() if args.no_compile or args.quick
                                     else COMPILED, device=args.device, minutes=args.minutes,
                                     checks=() if args.no_checks else None,
                                     log=say, **options)
        print(path)
        if not passed:
            raise KitError(f"gpu-check: some runs failed (marked FAILED above; details in {path})")
    elif args.command == "results":
        from .config import parse_overrides
        from .results import RESULTS_DIR, rewrite_results_md, run_study

        out_dir = args.out or RESULTS_DIR
        if args.rewrite:
            print(rewrite_results_md(out_dir, args.page))
        else:
            print(run_study(args.configs.replace(",", " ").split(), args.seeds, args.folds,
                            parse_overrides(args.overrides), out_dir=out_dir, results_md=args.page))
    elif args.command == "bundle":
        from .bundle import write_bundle

        print(write_bundle(args.out))
    elif args.command == "submit":
        api.submit(args.file, message=args.message, dry_run=args.dry_run, force=args.force,
                   data_dir=args.data_dir or (None if not args.file or api.read_submission_details(args.file)
                                              else load_experiment(args).data_dir))
    else:
        cfg = load_experiment(args)
        if args.command == "config":
            import yaml

            from .config import to_dict

            print(f"# {args.config}{''.join(' ' + pair for pair in args.overrides)}, as the kit reads it")
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        elif args.command == "cache":
            api.build_cache(cfg)
        elif args.command == "train":
            api.train(cfg, args.fold, force=args.force)
        elif args.command == "kaggle-run":
            from .kaggle_run import kaggle_run

            print(kaggle_run(cfg, accelerator=args.accelerator, submit=args.submit, force=args.force,
                             data_dir=args.data_dir))
        elif args.command == "train-all":
            api.train_all(cfg, force=args.force, parallel=args.parallel)
        elif args.command == "predict":
            names = args.exps.replace(",", " ").split()
            if len(names) > 1:
                path = api.predict_blend([load_experiment(args, name) for name in names], args.blend,
                                         allow_missing_folds=args.allow_missing_folds)
            else:
                path = api.predict(load_experiment(args, names[0]) if names else cfg,
                                   allow_missing_folds=args.allow_missing_folds)
            print(path)   # the CSV's path, last
        elif args.command == "report":
            names = args.exps.replace(",", " ").split()
            configs = [load_experiment(args, name) for name in names] if names else [cfg]
            print(api.report(configs, target_sensitivity=args.target_sensitivity,
                             saliency_images=args.saliency_images))
        elif args.command in ("tune", "prove"):
            from .tune import run_tune_command

            run_tune_command(args, cfg, lambda name: load_experiment(args, name))


def current_rank() -> int | None:
    """This process's rank once it has joined a multi-process group, else None."""
    from .distributed import current

    ranks = current()
    return ranks.rank if ranks.active else None


def stop_when_parent_dies() -> None:
    """A fold-parallel worker (KIT_PARENT_PID) stops as Ctrl-C would once its parent is gone. On Linux the kernel
    does it (PR_SET_PDEATHSIG, kit/parallel.py); elsewhere this watchdog thread."""
    parent = os.environ.get("KIT_PARENT_PID", "")
    if not parent.isdigit() or sys.platform.startswith("linux"):
        return
    import _thread
    import threading
    import time

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        _thread.interrupt_main()

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    stop_when_parent_dies()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit between options: argparse leaves the later ones over
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        command_parser(parser, args).unknown_arguments(extra)
    if "WORLD_SIZE" in os.environ:       # (kit.distributed imports torch: only then)
        from .distributed import launched_rank, launched_world

        if launched_world() > 1 and (args.command not in ("train", "train-all")
                                     or getattr(args, "parallel", "1") != "1"):
            if launched_rank() == 0:
                print(f"error: only `train` and `train-all` (without PARALLEL) run under torchrun (NPROC); run "
                      f"`{args.command}` as one process", file=sys.stderr)
            return 2
    return run_reporting_errors(lambda: run(args))


def lost_peer(err: BaseException) -> bool:
    """An error of a collective whose other side is gone (a rank killed, a machine lost): gloo's "Connection closed
    by peer", NCCL's errors, the store's."""
    import torch.distributed

    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(word in text for word in (
        "gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe", "ProcessGroup"))


def run_reporting_errors(work) -> int:
    """Run `work()`; what stops it becomes one line on stderr and an exit status: 2 for an error (a KitError, an
    OS error put in words, the loss of the other ranks under torchrun), 130 for Ctrl-C, 0 when it ends. Under
    torchrun (NPROC > 1) rank 0 speaks for what every rank shares."""
    under_torchrun = "WORLD_SIZE" in os.environ

    def say(*values, **options):
        if under_torchrun:
            from .distributed import launched_rank, launched_world

            if launched_world() > 1 and launched_rank() != 0:
                return
        print(*values, **options)
    try:
        work()
    except KitError as err:
        # a SharedError, or one raised before the ranks joined (a bad config), is the same on every rank
        rank = current_rank() if under_torchrun else None
        if rank is None or isinstance(err, SharedError):
            say(f"error: {err}", file=sys.stderr)
        else:
            print(f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    except OSError as err:              # one not already put in words where it happened
        from .io import os_error_message

        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except Interrupted as err:
        say(f"\n{err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        say("\ninterrupted: files written before are intact (every write is atomic); rerun the same command",
            file=sys.stderr)
        return 130
    except Exception as err:
        if not (under_torchrun and lost_peer(err)):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:120]        # gloo's "[…/pair.cc:561] " source location
        print(f"error (rank {current_rank()}): lost the other processes of the run ({first}); the launcher names "
              f"the rank that stopped first", file=sys.stderr)
        return 2
    return 0
