"""Evaluation report: one Markdown page per experiment, or several experiments side by side.

`make report` reads `runs/<experiment>/` (each finished fold's oof.csv, history.csv and metrics.json, plus the
newest test prediction of the experiment in submissions/) and writes `runs/<experiment>/report.md` with its PNG
figures beside it. `make report EXPS="a b"` puts experiments side by side instead: one table and one ROC plot in
`<out_dir>/compare/a+b/`. Both say where the models look: the share of their evidence for tumour inside the centre
32×32, from class-activation maps (kit/saliency.py) of a bounded sample of each fold's validation patches.

The numbers come from kit/metrics.py and the drawings from kit/figures.py; this module reads the run folder and
writes the page. It leads with ROC AUC (the competition's metric) and the operating point the report picks
(`metrics.chosen_point`), and says when the folds' own AUCs and the pooled one disagree.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import brier_score_loss

from .competition import CENTRE_SIZE, TRAIN_DIR, TRAIN_LABELS_CSV
from .config import Config
from .data import image_paths, read_image
from .errors import KitError
from .experiment import check_split_against_data, epochs_note, finished_folds, train_all_command
from .figures import (
    calibration_figure,
    confusion_matrices_figure,
    curve_series,
    gallery_figure,
    precision_recall_figure,
    roc_figure,
    save_figure,
    training_curves_figure,
)
from .io import TIMESTAMP_PATTERN, atomic_write_text
from .metrics import (
    CHOSEN_RULE,
    DEFAULT_THRESHOLD,
    AucSummary,
    OperatingPoint,
    auc_summary,
    chosen_point,
    classification_table,
    confident_hits,
    confident_mistakes,
    operating_points,
)
from .progress import say
from .runs import experiment_dir
from .saliency import SALIENCY_IMAGES, UNIFORM_CENTRE_SHARE, CentreEvidence, centre_evidence, read_patches, share_text
from .submission import read_submission_file

GALLERY_SIZE = 8                 # most confident mistakes shown per kind (false negatives, false positives)

# Figure files, written beside report.md
TRAINING_CURVES = "training_curves.png"
ROC = "roc.png"
PRECISION_RECALL = "precision_recall.png"
CONFUSION_MATRICES = "confusion_matrices.png"
CALIBRATION = "calibration.png"
MISTAKES = "mistakes.png"
SALIENCY = "saliency.png"


# ----------------------------------------------------------------------------------------------------------------
# Reading a run folder
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class RunFolder:
    """What the report reads from runs/<experiment>/: the finished folds, pooled, and the folds that are missing."""
    name: str
    directory: Path
    n_splits: int
    oof: pd.DataFrame                    # id, label, pred, fold: every finished fold's out-of-fold predictions
    histories: dict[int, pd.DataFrame]   # finished fold → its history.csv
    fold_metrics: dict[int, dict]        # finished fold → its metrics.json
    missing: dict[int, str]              # unfinished fold → why it is not counted
    epochs_note: str | None = None       # the finished folds ran another number of epochs than the config says

    @property
    def finished(self) -> list[int]:
        return sorted(self.fold_metrics)


def read_run_folder(cfg: Config) -> RunFolder:
    """Every finished fold of the experiment (as kit/runs.py defines it); the others are listed as missing."""
    directory = experiment_dir(cfg)
    train_first = f"run `{train_all_command(cfg)}` first"
    if not directory.is_dir():
        raise KitError(f"no run folder for `{cfg.name}`: {directory} does not exist; {train_first}")
    found, missing = finished_folds(cfg)
    if not found:
        why = "; ".join(f"fold {fold} {reason}" for fold, reason in missing.items())
        raise KitError(f"no finished fold of `{cfg.name}` in {directory} ({why}); {train_first}")
    if (Path(cfg.data_dir) / TRAIN_LABELS_CSV).is_file():     # without the data (a copied run folder) no check
        check_split_against_data(cfg, [f.fold for f in found])
    oof = pd.concat([f.oof.assign(fold=f.fold) for f in found], ignore_index=True)
    if oof["label"].nunique() < 2:
        raise KitError(f"the out-of-fold labels of `{cfg.name}` hold one class only, so ROC AUC is undefined")
    histories = {f.fold: f.history for f in found if f.history is not None}
    return RunFolder(cfg.name, directory, cfg.folds.n_splits, oof, histories, {f.fold: f.metrics for f in found},
                     missing, epochs_note(cfg, found))


def _stamp(path: Path) -> str:
    found = re.search(TIMESTAMP_PATTERN + "$", path.stem)
    return found.group(0) if found else ""


def _sidecar_experiment(csv_path: Path) -> str | None:
    try:
        return json.loads(csv_path.with_suffix(".json").read_text()).get("experiment")
    except (OSError, ValueError, AttributeError):
        return None


def find_test_prediction(submissions_dir: str | Path, experiment: str) -> Path | None:
    """The newest `make predict` CSV of `experiment`: named `<experiment>-<time>.csv`, or so named in its .json."""
    folder = Path(submissions_dir)
    if not folder.is_dir():
        return None
    own = [path for path in folder.glob("*.csv")
           if re.fullmatch(re.escape(experiment) + "-" + TIMESTAMP_PATTERN, path.stem)
           or _sidecar_experiment(path) == experiment]
    # the time in the name orders what `predict` wrote; the modification time orders the rest
    return max(own, key=lambda path: (_stamp(path), path.stat().st_mtime), default=None)


# ----------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------

def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _folds_line(run: RunFolder) -> str:
    return f"{len(run.finished)} of {run.n_splits} folds"


def _missing_folds(run: RunFolder) -> str:
    """Which folds are missing and why ('' when none is)."""
    if not run.missing:
        return ""
    missing = "; ".join(f"fold {fold} ({why})" for fold, why in sorted(run.missing.items()))
    return f"{missing}; the numbers pool folds {', '.join(map(str, run.finished))} only"


def lead(run: RunFolder, aucs: AucSummary, chosen: OperatingPoint) -> str:
    """The first line: ROC AUC (pooled and per fold) and sensitivity and specificity at the chosen threshold."""
    return (f"{run.name}: OOF ROC AUC {aucs.overall:.4f} ({_folds_line(run)}; per fold {aucs.mean:.4f} ± "
            f"{aucs.std:.4f}); at the {chosen.rule} threshold {chosen.threshold:.4g}: sensitivity "
            f"{chosen.sensitivity:.4f}, specificity {chosen.specificity:.4f}")


def fold_disagreement(aucs: AucSummary) -> str | None:
    """When the folds' own AUCs and the pooled one differ by more than noise, a sentence saying so and why."""
    if not aucs.folds_disagree:
        return None
    side = "below" if aucs.overall < aucs.within_folds else "above"
    return (f"the pooled OOF AUC {aucs.overall:.4f} is {side} the folds' own ({aucs.within_folds:.4f} over the "
            f"tumour/no-tumour pairs within a fold) by more than noise (± {aucs.noise:.4f}, two standard errors): "
            f"pairs from two folds are ordered at {aucs.across_folds:.4f}. The folds' scores are calibrated "
            f"differently, so pooling mixes their scales; each fold ranks its own patches as the per-fold AUCs say, "
            f"and the test prediction averages the folds onto one scale")


def headline(run: RunFolder, aucs: AucSummary, points: list[OperatingPoint]) -> list[str]:
    """The lines printed by `make report` and shown at the top of the page."""
    lines = [lead(run, aucs, chosen_point(points))]
    if fold_disagreement(aucs):
        lines.append(f"  folds and pooled disagree: {fold_disagreement(aucs)}")
    for point in points:
        test = f", test called positive {_share(point.test_positive_share)}" if point.test_positive_share is not None \
            else ""
        lines.append(f"  {point.rule}: threshold {point.threshold:.4g}, sensitivity {point.sensitivity:.4f}, "
                     f"specificity {point.specificity:.4f}{test}")
    if run.missing:
        lines.append(f"  missing folds: {_missing_folds(run)}")
    if run.epochs_note:
        lines.append(f"  {run.epochs_note}")
    return lines


def _test_prediction(cfg: Config) -> tuple[np.ndarray | None, str]:
    """(test probabilities or None, a sentence saying where they came from or why there are none)."""
    path = find_test_prediction(cfg.submissions_dir, cfg.name)
    if path is None:
        return None, f"No test prediction of `{cfg.name}` in `{cfg.submissions_dir}/` (run `make predict`)."
    try:
        scores = pd.to_numeric(read_submission_file(path)["label"], errors="raise").to_numpy(dtype=float)
    except (KitError, KeyError, ValueError) as err:
        return None, f"Test prediction `{path}` skipped: {err}."
    return scores, (f"Test prediction: `{path}` ({len(scores):,} patches). Its probabilities are averaged over "
                    f"folds and TTA views; each OOF one comes from the single fold that held its patch out (with the same "
                    f"TTA views), so the shares may differ for that reason too.")


def _gallery(cfg: Config, false_negatives: pd.DataFrame, false_positives: pd.DataFrame, out: Path,
             gallery_size: int) -> tuple[str | None, str]:
    """Draw the most confident mistakes; (figure file or None, a sentence saying what it shows or why not)."""
    (out / MISTAKES).unlink(missing_ok=True)       # never leave an earlier run's gallery beside this report
    if false_negatives.empty and false_positives.empty:
        return None, f"No false negatives or false positives at {DEFAULT_THRESHOLD:g}: nothing to show."
    image_dir = Path(cfg.data_dir) / TRAIN_DIR
    if not image_dir.is_dir():
        return None, f"Gallery skipped: the training images are not available ({image_dir} not found)."
    try:
        rows = [(f"{title}: {min(len(frame), gallery_size)} of {len(frame)}", frame.head(gallery_size),
                 [read_image(p) for p in image_paths(image_dir, frame["id"].head(gallery_size))])
                for title, frame in (("false negatives (tumour, lowest scores)", false_negatives),
                                     ("false positives (no tumour, highest scores)", false_positives))]
    except KitError as err:
        return None, f"Gallery skipped: {err}."
    save_figure(gallery_figure(rows), out / MISTAKES)
    return MISTAKES, (f"The most confident mistakes at threshold {DEFAULT_THRESHOLD:g} ({len(false_negatives):,} "
                      f"false negatives, {len(false_positives):,} false positives), from `{image_dir}`; "
                      f"the yellow square is the centre {CENTRE_SIZE}×{CENTRE_SIZE} that decides the label.")


def _saliency(cfg: Config, run: RunFolder, gallery: dict[str, pd.DataFrame], out: Path, images_per_fold: int
              ) -> tuple[CentreEvidence | None, str | None, str]:
    """The centre evidence and its gallery: (evidence, figure file or None, a paragraph saying what the numbers
    are), or (None, None, why there are none)."""
    (out / SALIENCY).unlink(missing_ok=True)      # never leave an earlier run's maps beside this report
    try:
        evidence = centre_evidence(cfg, run.oof, images_per_fold, gallery)
    except KitError as err:
        return None, None, str(err)
    note = (f"Class-activation maps (HiResCAM, from the grad-cam package) of the tumour logit, read at "
            f"`{evidence.layer}` and upsampled to 96×96, over up to {images_per_fold} validation patches per fold "
            f"that the fold's best.pt calls tumour (p ≥ {DEFAULT_THRESHOLD:g}), each patch seen by the fold that "
            f"held it out (`--saliency-images` sets how many; 0 leaves the maps out). The share is the maps' mass "
            f"inside the centre {CENTRE_SIZE}×{CENTRE_SIZE}, which alone decides the label, over their whole mass: "
            f"{UNIFORM_CENTRE_SHARE:.3f} (32²/96²) for a map spread evenly, lower for a model that finds its "
            f"evidence in the outer ring.")
    empty = [title.split(" (")[0] for title, frame in gallery.items() if frame.empty]
    note += f" The gallery has no row of {' or of '.join(empty)}: there are none." if empty else ""
    if len(empty) == len(gallery):
        return evidence, None, note
    image_dir = Path(cfg.data_dir) / TRAIN_DIR
    rows = [(title, frame, list(read_patches(image_dir, frame["id"])) if len(frame) else [])
            for title, frame in gallery.items()]
    save_figure(gallery_figure(rows, maps=[evidence.gallery_maps[title] for title in gallery]), out / SALIENCY)
    return evidence, SALIENCY, note


def write_report(cfg: Config, target_sensitivity: float, gallery_size: int = GALLERY_SIZE,
                 saliency_images: int = SALIENCY_IMAGES, log=say) -> Path:
    """Write runs/<experiment>/report.md and its figures; log the headline numbers; return the page's path."""
    run = read_run_folder(cfg)
    out = run.directory
    labels, scores = run.oof["label"].to_numpy(), run.oof["pred"].to_numpy()
    test_scores, test_note = _test_prediction(cfg)
    aucs = auc_summary(run.oof)
    classes = classification_table(labels, scores)
    points = operating_points(labels, scores, target_sensitivity, test_scores)
    best_epochs = {fold: metrics.get("best_epoch") for fold, metrics in run.fold_metrics.items()}

    curves = curve_series(run.oof)
    save_figure(roc_figure(curves), out / ROC)
    save_figure(precision_recall_figure(curves), out / PRECISION_RECALL)
    save_figure(confusion_matrices_figure(points), out / CONFUSION_MATRICES)
    save_figure(calibration_figure(labels, scores), out / CALIBRATION)
    if run.histories:
        save_figure(training_curves_figure(run.histories, best_epochs), out / TRAINING_CURVES)
    else:
        (out / TRAINING_CURVES).unlink(missing_ok=True)
    false_negatives, false_positives = confident_mistakes(run.oof)
    gallery_file, gallery_note = _gallery(cfg, false_negatives, false_positives, out, gallery_size)
    saliency_gallery = {f"{title}: {min(len(frame), gallery_size)} of {len(frame)}": frame.head(gallery_size)
                        for title, frame in (("true positives (tumour, highest scores)", confident_hits(run.oof)),
                                             ("false positives (no tumour, highest scores)", false_positives),
                                             ("false negatives (tumour, lowest scores)", false_negatives))}
    evidence, saliency_file, saliency_note = _saliency(cfg, run, saliency_gallery, out, saliency_images)

    looks = evidence.line() if evidence is not None else f"centre evidence share: skipped ({saliency_note})"
    lines = headline(run, aucs, points) + [f"  {looks}"]
    page = [f"# Evaluation report: `{run.name}`", "",
            f"Written {datetime.now():%Y-%m-%d %H:%M} from `{out}` ({_folds_line(run)} finished, "
            f"{len(run.oof):,} out-of-fold patches, {np.mean(labels):.1%} with tumour). OOF = each fold's predictions "
            f"on its held-out patches at its best epoch, pooled. A threshold t calls a patch positive when its "
            f"probability is ≥ t.", ""]
    if run.missing:
        page += [f"**Missing folds:** {_missing_folds(run)}.", ""]
    page += ["```", *lines, "```", ""]

    fold_rows = []
    for fold in run.finished:
        rows = run.oof[run.oof["fold"] == fold]
        fold_rows.append([fold, f"{len(rows):,}", f"{rows['label'].mean():.1%}", f"{aucs.per_fold[fold]:.4f}",
                          run.fold_metrics[fold].get("best_epoch", "—")])
    fold_rows += [[fold, "—", "—", f"missing: {why}", "—"] for fold, why in sorted(run.missing.items())]
    fold_rows += [["pooled OOF", f"{len(run.oof):,}", f"{np.mean(labels):.1%}", f"**{aucs.overall:.4f}**", ""],
                  ["mean ± std over folds", "", "", f"{aucs.mean:.4f} ± {aucs.std:.4f}", ""]]
    page += ["## ROC AUC", "", markdown_table(["fold", "patches", "with tumour", "ROC AUC", "best epoch"], fold_rows),
             ""]
    if fold_disagreement(aucs):
        page += [f"**Folds and pooled disagree:** {fold_disagreement(aucs)}.", ""]
    page += [f"![ROC curves, per fold and pooled; right: the top-left corner]({ROC})", "",
             f"![Precision–recall curves, per fold and pooled]({PRECISION_RECALL})", ""]

    point_rows = [[point.rule, f"{point.threshold:.4g}", f"{point.tp:,}", f"{point.fn:,}", f"{point.fp:,}",
                   f"{point.tn:,}", f"{point.sensitivity:.4f}", f"{point.specificity:.4f}", f"{point.precision:.4f}",
                   _share(point.positive_share), _share(point.test_positive_share)] for point in points]
    page += ["## Thresholds", "",
             f"Chosen on the OOF predictions: the seed's {DEFAULT_THRESHOLD:g}, maximal Youden J (sensitivity + "
             f"specificity − 1), maximal F1 of the tumour class, and the highest threshold that keeps "
             f"sensitivity ≥ {target_sensitivity:g} (`TARGET_SENSITIVITY=`). \"Called positive\" is the share of "
             f"patches at or above the threshold. The headline uses {CHOSEN_RULE}: the loss (pos_weight, focal, label "
             f"smoothing) moves the scores, so {DEFAULT_THRESHOLD:g} is no fixed point.", "", test_note, "",
             markdown_table(["rule", "threshold", "TP", "FN", "FP", "TN", "sensitivity", "specificity", "precision",
                             "OOF called positive", "test called positive"], point_rows), "",
             f"![Confusion matrices at each threshold]({CONFUSION_MATRICES})", ""]

    class_rows = [[name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1-score']:.4f}",
                   f"{int(row['support']):,}"] for name, row in classes.iterrows()]
    page += [f"## The seed's classification report at threshold {DEFAULT_THRESHOLD:g}", "",
             f"Accuracy {classes.attrs['accuracy']:.4f}. Recall of the tumour class is the sensitivity, recall of "
             f"the other the specificity.", "",
             markdown_table(["class", "precision", "recall", "F1", "patches"], class_rows), ""]

    page += ["## Training curves", ""]
    page += [f"![Training curves per fold]({TRAINING_CURVES})" if run.histories
             else "No history.csv in the finished folds: no curves to draw.", ""]
    page += ["## Calibration", "",
             f"Brier score {brier_score_loss(labels, scores):.4f}. Points on the diagonal mean a predicted "
             f"probability p comes true for a share p of the patches.", "",
             f"![Calibration curve and score histogram]({CALIBRATION})", ""]

    mistake_rows = [[kind, f"`{row['id']}`", row["fold"], row["label"], f"{row['pred']:.4f}"]
                    for kind, frame in (("false negative", false_negatives), ("false positive", false_positives))
                    for _, row in frame.head(gallery_size).iterrows()]
    page += ["## Most confident mistakes", "", gallery_note, ""]
    if gallery_file:
        page += [f"![Most confident false negatives and false positives]({gallery_file})", ""]
    if mistake_rows:
        page += [markdown_table(["kind", "id", "fold", "label", "score"], mistake_rows), ""]

    page += ["## Where the model looks", ""]
    if evidence is not None:
        share_rows = [[fold, f"{count:,}", share_text(share)]
                      for fold, (count, share) in sorted(evidence.per_fold.items())]
        share_rows += [["all sampled", f"{evidence.images:,}", f"**{evidence.shown}**"],
                       ["a flat map", "", f"{UNIFORM_CENTRE_SHARE:.3f}"]]
        page += [f"Share of the evidence for tumour inside the centre {CENTRE_SIZE}×{CENTRE_SIZE}: "
                 f"**{evidence.shown}** (a flat map gives {UNIFORM_CENTRE_SHARE:.3f}).", "", saliency_note, "",
                 markdown_table(["fold", "patches", "centre evidence share"], share_rows), ""]
        if saliency_file:
            page += [f"![Where the model finds tumour: true positives, false positives, false negatives]"
                     f"({saliency_file})", "",
                     f"Each map over its patch (red: the strongest evidence for tumour, dark blue: none); the white "
                     f"square is the centre {CENTRE_SIZE}×{CENTRE_SIZE}, and under each score is the share of that "
                     f"patch's evidence inside it.", ""]
    else:
        page += [f"Saliency skipped: {saliency_note}.", ""]

    path = out / "report.md"
    atomic_write_text(path, "\n".join(page))
    for line in lines:
        log(line)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Several experiments side by side
# ----------------------------------------------------------------------------------------------------------------

def comparison_dir(cfgs: list[Config]) -> Path:
    """`<out_dir of the first>/compare/<a>+<b>+…/`: one folder per set of experiments compared."""
    return Path(cfgs[0].out_dir) / "compare" / "+".join(cfg.name for cfg in cfgs)


def write_comparison(cfgs: list[Config], target_sensitivity: float, saliency_images: int = SALIENCY_IMAGES,
                     log=say) -> Path:
    """One table and one ROC plot (pooled OOF per experiment) for several experiments, with each one's centre
    evidence share; return the page's path."""
    names = [cfg.name for cfg in cfgs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise KitError(f"EXPS names experiment {', '.join(repeated)} more than once; list each once")
    runs = [read_run_folder(cfg) for cfg in cfgs]
    out = comparison_dir(cfgs)
    rows, lines, notes = [], [], []
    for cfg, run in zip(cfgs, runs):
        labels, scores = run.oof["label"].to_numpy(), run.oof["pred"].to_numpy()
        aucs = auc_summary(run.oof)
        points = operating_points(labels, scores, target_sensitivity)
        default, youden, sensitive = points[0], chosen_point(points), points[-1]
        own_report = run.directory / "report.md"
        name = (f"[{run.name}]({os.path.relpath(own_report, out)})" if own_report.is_file() else run.name)
        rows.append([name, _folds_line(run), f"{aucs.overall:.4f}", f"{aucs.mean:.4f} ± {aucs.std:.4f}",
                     f"{youden.threshold:.4g} ({youden.sensitivity:.4f} / {youden.specificity:.4f})",
                     f"{sensitive.threshold:.4g} ({sensitive.specificity:.4f})",
                     f"{default.sensitivity:.4f} / {default.specificity:.4f}"])
        try:
            evidence = centre_evidence(cfg, run.oof, saliency_images)
            rows[-1].append(f"{evidence.shown} ({evidence.images:,})")
            share = f", centre evidence share {evidence.shown}"
        except KitError as err:
            rows[-1].append("—")
            notes.append(f"- `{run.name}`: no centre evidence share: {err}.")
            share = ""
        lines.append(f"{lead(run, aucs, youden)}; specificity at sensitivity ≥ {target_sensitivity:g} "
                     f"{sensitive.specificity:.4f}{share}")
        if fold_disagreement(aucs):
            notes.append(f"- `{run.name}`: {fold_disagreement(aucs)}.")
        if run.missing:
            notes.append(f"- `{run.name}`: {_missing_folds(run)}.")
        if run.epochs_note:
            notes.append(f"- {run.epochs_note}.")

    save_figure(roc_figure([(run.name, run.oof["label"].to_numpy(), run.oof["pred"].to_numpy(), True)
                            for run in runs], title="ROC (pooled out-of-fold)"), out / ROC)
    headers = ["experiment", "folds", "OOF ROC AUC", "per fold mean ± std",
               f"{CHOSEN_RULE}: threshold (sensitivity / specificity)",
               f"sensitivity ≥ {target_sensitivity:g}: threshold (specificity)",
               f"sensitivity / specificity at {DEFAULT_THRESHOLD:g}",
               f"centre evidence share (patches; flat map {UNIFORM_CENTRE_SHARE:.3f})"]
    page = [f"# Experiments side by side: {', '.join(f'`{name}`' for name in names)}", "",
            f"Written {datetime.now():%Y-%m-%d %H:%M}. Each experiment's out-of-fold predictions are pooled over its "
            f"finished folds; thresholds are chosen on them. The centre evidence share is the share of the models' "
            f"evidence for tumour (class-activation maps of up to {saliency_images} validation patches per fold "
            f"that the fold calls tumour) inside the centre {CENTRE_SIZE}×{CENTRE_SIZE} that decides the label; a map "
            f"spread evenly gives {UNIFORM_CENTRE_SHARE:.3f}. `make report EXP=<name>` writes one experiment's full "
            f"report, with the maps.", ""]
    if notes:
        page += ["**Notes.**", "", *notes, ""]
    page += [markdown_table(headers, rows), "", f"![ROC curves of the experiments]({ROC})", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(page))
    for line in lines:
        log(line)
    return path
