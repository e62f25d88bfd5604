"""What a recipe search found, and whether it holds: the study's report (trials over time, parameter importances,
slice plots, the pruned share, minutes spent → runs/<name>/tune/tune.md and PNGs), and `prove`, which retrains the
starting and the tuned config on every fold over several seeds and asks a paired test whether the gain beats seed
noise (one fold subset and one seed can flatter a recipe: the search picked the luckiest of many draws)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import yaml

from .config import Config, apply_overrides, load_config, to_dict
from .errors import KitError
from .io import atomic_write_text
from .progress import duration
from .runs import experiment_dir

MIN_SEEDS = 3
SIGNIFICANCE = 0.05          # one-sided: the tuned recipe must beat the start, not merely differ from it


def tune_dir(cfg: Config) -> Path:
    """runs/<name>/tune/: the study's journal, its report and figures, prove's verdict."""
    return experiment_dir(cfg) / "tune"


# ----------------------------------------------------------------------------------------------------------------
# The study's report
# ----------------------------------------------------------------------------------------------------------------

def write_study_report(cfg: Config, study, folder: Path, seconds: float, space_path: Path, folds) -> dict:
    """tune.md and its figures in `folder`; returns the summary (counts, minutes, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    states = [t.state.name for t in study.trials]
    cut = [t for t in study.trials if "cut" in t.user_attrs]
    trial_seconds = sum(t.user_attrs.get("seconds", 0.0) for t in study.trials)
    summary = {"trials": len(states), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
               "cut": len(cut), "failed": states.count("FAIL") - len(cut), "minutes_this_call": seconds / 60,
               "minutes_in_trials": trial_seconds / 60, "figures": write_figures(study, folder),
               "report": folder / "tune.md"}
    best = None
    if summary["complete"]:
        best = study.best_trial
    lines = [f"# Recipe search: {cfg.name}", "",
             f"Space `{space_path}`, fold(s) {', '.join(map(str, folds))} of {cfg.folds.n_splits}, {cfg.epochs} "
             f"epochs per fold (the pruning resource), seed {cfg.seed}.", "",
             f"- trials: {summary['trials']} ({summary['complete']} complete, {summary['pruned']} pruned = "
             f"{summary['pruned'] / max(1, summary['trials']):.0%}, {summary['cut']} cut by Ctrl-C, "
             f"{summary['failed']} failed)",
             f"- time: {duration(seconds)} in this call; {duration(trial_seconds)} of trials over the whole study",
             (f"- best: trial {best.number}, mean OOF AUC {best.value:.4f}: "
              + ", ".join(f"`{key}={value}`" for key, value in best.params.items())) if best else "- best: none yet",
             "", *(f"![{name}]({path.name})" for name, path in summary["figures"].items()), "",
             "| trial | state | AUC | seconds | params |", "| --- | --- | --- | --- | --- |"]
    for t in study.trials:
        state = "CUT" if "cut" in t.user_attrs else t.state.name
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        lines.append(f"| {t.number} | {state} | {'' if value is None else f'{value:.4f}'} | "
                     f"{t.user_attrs.get('seconds', 0):.0f} | "
                     + ", ".join(f"{key}={value}" for key, value in t.params.items()) + " |")
    atomic_write_text(summary["report"], "\n".join(lines) + "\n")
    return summary


def write_figures(study, folder: Path) -> dict[str, Path]:
    """Optimization history, parameter importances and slice plots (optuna.visualization.matplotlib), each drawn
    only when the study has what it needs (importances: two complete trials and a parameter that varied)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    figures = {}
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    wanted = {"optimization history": ("history.png", plots.plot_optimization_history, 1),
              "parameter importances": ("importances.png", plots.plot_param_importances, 2),
              "slice": ("slice.png", plots.plot_slice, 1)}
    for name, (file_name, plot, needed) in wanted.items():
        if len(complete) < needed:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # optuna marks its matplotlib plots experimental
                axes = plot(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(folder / file_name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            figures[name] = folder / file_name
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue                 # e.g. importances when no parameter varied: the table still says it all
    return figures


def write_tuned_config(cfg: Config, study, folder: Path, folds, space_path: Path) -> Path:
    """<folder>/<name>-tuned.yaml: the starting config with the best trial's values, under a header saying what it
    was tuned on; `make train-all CONFIG=…` trains it."""
    best = study.best_trial
    tuned = apply_overrides(cfg, {**best.params, "name": f"{cfg.name}-tuned"})
    start = flat_values(to_dict(cfg))
    changes = [f"{key}: {show_value(start[key])} → {show_value(value)}" for key, value in best.params.items()
               if start[key] != value] or ["none: the starting values were best"]
    pruned = sum(t.state.name == "PRUNED" for t in study.trials)
    header = [f"Tuned from experiment `{cfg.name}` by `make tune` (kit/tune.py), space {space_path}.",
              f"Best of {len(study.trials)} trials ({pruned} pruned): trial {best.number}, mean OOF AUC "
              f"{best.value:.4f} on fold(s) {', '.join(map(str, folds))} of {cfg.folds.n_splits} "
              f"(folds.seed {cfg.folds.seed}), {cfg.epochs} epochs, seed {cfg.seed}"
              + (f", first {cfg.max_train_images} training images" if cfg.max_train_images else "") + ".",
              "Changed: " + "; ".join(changes) + ".",
              "One fold subset and one seed can flatter a recipe: `make prove CONFIG=… TUNED=…` checks the gain "
              "over seeds on every fold."]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(to_dict(tuned), sort_keys=False)
    path = folder / f"{cfg.name}-tuned.yaml"
    atomic_write_text(path, text)
    load_config(path)              # what we hand the user must load
    return path



def flat_values(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and f"{prefix}{key}" != "model.timm_kwargs":
            flat.update(flat_values(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def show_value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)



# ----------------------------------------------------------------------------------------------------------------
# prove: the gain over seeds, paired
# ----------------------------------------------------------------------------------------------------------------

def paired_gain(start_aucs: list[float], tuned_aucs: list[float]) -> dict:
    """The tuned minus the starting CV AUC, seed by seed: mean, sample std, t and the one-sided p-value; `holds`
    when the gain is positive and p < SIGNIFICANCE (Student's t with n - 1 degrees of freedom)."""
    from scipy import stats

    differences = [tuned - start for start, tuned in zip(start_aucs, tuned_aucs)]
    n = len(differences)
    mean = statistics.fmean(differences)
    std = statistics.stdev(differences) if n > 1 else float("nan")
    if std == 0:
        t, p = (math.inf, 0.0) if mean > 0 else (-math.inf if mean < 0 else 0.0, 1.0)
    else:
        t = mean / (std / math.sqrt(n))
        p = float(stats.t.sf(t, n - 1))
    return {"differences": differences, "mean": mean, "std": std, "t": t, "p": p,
            "holds": bool(mean > 0 and p < SIGNIFICANCE)}


def prove(cfg: Config, tuned_cfg: Config, seeds: int = MIN_SEEDS, log=print, tuned_path: str | Path | None = None,
          start_path: str | Path | None = None) -> dict:
    """Train both configs on every fold for `seeds` seeds (cfg.seed, +1, …; each as `<name>-seed<s>`, resumable),
    compare their CV AUCs (mean of the folds' OOF AUCs) seed by seed, and recommend the tuned config only when the
    gain holds beyond seed noise; otherwise the starting one."""
    if seeds < MIN_SEEDS:
        raise KitError(f"prove: SEEDS={seeds} is too few to tell a gain from seed noise; use at least {MIN_SEEDS}")
    if (tuned_cfg.data_dir, tuned_cfg.folds) != (cfg.data_dir, cfg.folds):
        raise KitError(f"prove: `{tuned_cfg.name}` and `{cfg.name}` must share data_dir and folds (the same split), "
                       f"or the comparison is not paired; set them equal in the tuned config")
    from .fold import train_fold

    scores = {"start": [], "tuned": []}
    for seed in range(cfg.seed, cfg.seed + seeds):
        for label, config in (("start", cfg), ("tuned", tuned_cfg)):
            run = apply_overrides(config, {"seed": seed, "name": f"{config.name}-seed{seed}"})
            aucs = [train_fold(run, fold, log=lambda *_: None)["oof_auc"] for fold in range(cfg.folds.n_splits)]
            scores[label].append(statistics.fmean(aucs))
            log(f"prove: {config.name} seed {seed}: CV AUC {scores[label][-1]:.4f} over {len(aucs)} folds")
    test = paired_gain(scores["start"], scores["tuned"])
    winner = tuned_cfg if test["holds"] else cfg
    verdict = (f"the gain holds beyond seed noise (mean {test['mean']:+.4f}, sample std {test['std']:.4f}, "
               f"t {test['t']:.2f}, one-sided p {test['p']:.3f} over {seeds} seeds): use `{tuned_cfg.name}`"
               if test["holds"] else
               f"the gain does not hold beyond seed noise (mean {test['mean']:+.4f}, sample std {test['std']:.4f}, "
               f"t {test['t']:.2f}, one-sided p {test['p']:.3f} over {seeds} seeds): keep `{cfg.name}`")
    log(f"prove: {verdict}")
    result = {**test, "start": scores["start"], "tuned": scores["tuned"], "seeds": seeds,
              "recommended": winner.name,
              "recommended_path": str((tuned_path if test["holds"] else start_path) or ""), "verdict": verdict}
    folder = tune_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"| {seed} | {start:.4f} | {tuned:.4f} | {tuned - start:+.4f} |" for seed, start, tuned in
            zip(range(cfg.seed, cfg.seed + seeds), scores["start"], scores["tuned"])]
    atomic_write_text(folder / "prove.md", "\n".join(
        [f"# `{tuned_cfg.name}` against `{cfg.name}`", "", f"CV AUC (mean of {cfg.folds.n_splits} folds' OOF AUC) "
         f"per seed, paired:", "", f"| seed | {cfg.name} | {tuned_cfg.name} | gain |", "| --- | --- | --- | --- |",
         *rows, "", f"Verdict: {verdict}."]) + "\n")
    result["report"] = folder / "prove.md"
    return result
