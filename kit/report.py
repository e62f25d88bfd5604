"""Evaluation report: out-of-fold metrics, operating thresholds, figures and one Markdown page per experiment.

`make report` reads `runs/<experiment>/` (each finished fold's oof.csv, history.csv and metrics.json, plus the
newest test prediction of the experiment in submissions/) and writes `runs/<experiment>/report.md` with its PNG
figures beside it. `make report EXPS="a b"` puts experiments side by side instead: one table and one ROC plot in
`<out_dir>/compare/a+b/`. Both say where the models look: the share of their evidence for tumour inside the centre
32×32, from class-activation maps (kit/saliency.py) of a bounded sample of each fold's validation patches.

The metrics are functions of labels and scores (scikit-learn underneath) that tests call directly; the figures and
the page are built from them. A threshold t calls a patch positive when its probability is ≥ t, which is
scikit-learn's convention for its curves, so a threshold read off a curve reproduces that curve's point.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    average_precision_score,
    brier_score_loss,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from .checkpoints import model_from_best
from .competition import CENTRE_SIZE, CENTRE_START, TRAIN_DIR, TRAIN_LABELS_CSV
from .config import Config
from .data import image_paths, read_image
from .device import select_device
from .errors import KitError
from .io import TIMESTAMP_PATTERN, atomic_path, atomic_write_text
from .runs import BEST, check_split_against_data, epochs_note, experiment_dir, finished_folds, fold_dir
from .saliency import (
    SALIENCY_IMAGES,
    UNIFORM_CENTRE_SHARE,
    centre_share,
    centre_shares,
    evidence_maps,
    hirescam_class,
    share_sample,
    target_layer,
)
from .submission import read_submission_file

matplotlib.use("Agg")     # figures go to files: no display needed (servers, notebook kernels, CI)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DEFAULT_THRESHOLD = 0.5          # the seed notebook's cut-off
GALLERY_SIZE = 8                 # most confident mistakes shown per kind (false negatives, false positives)
CLASS_NAMES = ("no tumour (0)", "tumour (1)")
CALIBRATION_BINS = 10
FIGURE_DPI = 110

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
    train_first = f"run `make train-all CONFIG=...` for `{cfg.name}` first"
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
# Metrics
# ----------------------------------------------------------------------------------------------------------------

def roc_auc_or_nan(labels, scores) -> float:
    """ROC AUC, or NaN when only one class is present (a tiny fold), instead of scikit-learn's exception."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


@dataclass
class AucSummary:
    overall: float                 # the pooled out-of-fold predictions
    per_fold: dict[int, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_fold.values())))

    @property
    def std(self) -> float:
        """Population standard deviation over folds (numpy's default), so one fold gives 0 rather than NaN."""
        return float(np.std(list(self.per_fold.values())))


def auc_summary(oof: pd.DataFrame) -> AucSummary:
    """ROC AUC of the pooled OOF predictions and of each fold (`oof` has columns label, pred, fold)."""
    per_fold = {int(fold): roc_auc_or_nan(rows["label"], rows["pred"]) for fold, rows in oof.groupby("fold")}
    return AucSummary(roc_auc_or_nan(oof["label"], oof["pred"]), per_fold)


def classification_table(labels, scores, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """The seed's classification report at `threshold`: precision, recall, F1 and support per class, plus averages;
    `.attrs["accuracy"]` holds the accuracy."""
    report = classification_report(labels, (np.asarray(scores) >= threshold).astype(int), labels=[0, 1],
                                   target_names=list(CLASS_NAMES), output_dict=True, zero_division=0)
    accuracy = report.pop("accuracy")
    table = pd.DataFrame(report).T[["precision", "recall", "f1-score", "support"]]
    table["support"] = table["support"].astype(int)
    table.attrs["accuracy"] = float(accuracy)
    return table


def youden_threshold(labels, scores) -> float:
    """The threshold of maximal Youden J = sensitivity + specificity − 1; ties go to the higher threshold."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    j = (tpr - fpr)[1:]           # thresholds[0] is +inf: nothing called positive
    return float(thresholds[1:][np.argmax(j)])   # thresholds fall, so the first maximum is the highest threshold


def max_f1_threshold(labels, scores) -> float:
    """The threshold of maximal F1 of the positive class; ties go to the higher threshold."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]          # the last point (recall 0) has no threshold
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=precision + recall > 0)
    highest_first = np.arange(len(f1))[::-1]                 # thresholds rise here
    return float(thresholds[highest_first[np.argmax(f1[highest_first])]])


def sensitivity_threshold(labels, scores, target: float) -> float:
    """The highest threshold whose sensitivity reaches `target`: the best specificity that misses at most
    1 − target of the tumours."""
    _, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    reached = np.flatnonzero(tpr >= target - 1e-12)          # tolerance: 19/20 must count as 0.95
    return float(thresholds[reached[0]])


@dataclass
class OperatingPoint:
    """The confusion matrix at one threshold, and the share of test patches it would call positive."""
    rule: str
    threshold: float
    tn: int
    fp: int
    fn: int
    tp: int
    test_positive_share: float | None = None

    @property
    def sensitivity(self) -> float:
        return self.tp / max(1, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self.tn / max(1, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def positive_share(self) -> float:
        """Share of the OOF patches called positive, to compare with the test set's."""
        return (self.tp + self.fp) / max(1, self.tn + self.fp + self.fn + self.tp)

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.tn, self.fp], [self.fn, self.tp]])


def operating_point(labels, scores, threshold: float, rule: str, test_scores=None) -> OperatingPoint:
    predicted = (np.asarray(scores) >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    test_share = None if test_scores is None else float(np.mean(np.asarray(test_scores) >= threshold))
    return OperatingPoint(rule, float(threshold), tn, fp, fn, tp, test_share)


def operating_points(labels, scores, target_sensitivity: float, test_scores=None) -> list[OperatingPoint]:
    """The seed's 0.5, then thresholds chosen on these (OOF) predictions: max Youden J, max F1, target sensitivity."""
    rules = [(f"{DEFAULT_THRESHOLD:g} (seed default)", DEFAULT_THRESHOLD),
             ("max Youden J", youden_threshold(labels, scores)),
             ("max F1", max_f1_threshold(labels, scores)),
             (f"sensitivity ≥ {target_sensitivity:g}", sensitivity_threshold(labels, scores, target_sensitivity))]
    return [operating_point(labels, scores, threshold, rule, test_scores) for rule, threshold in rules]


def confident_mistakes(oof: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD):
    """(false negatives, lowest score first; false positives, highest score first) at `threshold`."""
    false_negatives = oof[(oof["label"] == 1) & (oof["pred"] < threshold)].sort_values("pred", kind="stable")
    false_positives = oof[(oof["label"] == 0) & (oof["pred"] >= threshold)].sort_values("pred", ascending=False,
                                                                                         kind="stable")
    return false_negatives, false_positives


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------

def save_figure(figure, path: Path) -> Path:
    """Write a PNG atomically and free the figure."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def plot_training_curves(histories: dict[int, pd.DataFrame], best_epochs: dict[int, int], path: Path) -> Path:
    """Train loss, val loss and val AUC by epoch, one line per fold; a dot marks each fold's best epoch."""
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for fold, history in sorted(histories.items()):
        for ax, column in zip(axes, ("train_loss", "val_loss", "val_auc")):
            line, = ax.plot(history["epoch"], history[column], marker=".", label=f"fold {fold}")
            best = history[history["epoch"] == best_epochs.get(fold)]
            if column == "val_auc" and not best.empty:
                ax.plot(best["epoch"], best[column], "o", color=line.get_color(), markersize=8, alpha=0.5)
    # val_loss is the training loss (focal, smoothing, pos_weight included) on the held-out rows: one scale for both
    for ax, title in zip(axes, ("train loss (the configured loss)", "validation loss (the same loss)",
                                "validation ROC AUC (dot: best epoch)")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    return save_figure(figure, path)


def _curve_series(oof: pd.DataFrame, overall_name: str = "all folds") -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(name, labels, scores, bold) per fold, faint, then the pooled OOF predictions, bold."""
    series = [(f"fold {fold}", rows["label"].to_numpy(), rows["pred"].to_numpy(), False)
              for fold, rows in oof.groupby("fold")]
    return series + [(overall_name, oof["label"].to_numpy(), oof["pred"].to_numpy(), True)]


def _line_style(bold: bool, single_bold: bool) -> dict:
    if not bold:
        return {"linewidth": 1, "alpha": 0.45}
    return {"linewidth": 2.2, "color": "black"} if single_bold else {"linewidth": 2}


def plot_roc(series, path: Path, title: str = "ROC (out-of-fold)") -> Path:
    """ROC curves of `series` = [(name, labels, scores, bold)]; the legend gives each curve's AUC."""
    figure, ax = plt.subplots(figsize=(5.5, 5.2))
    single_bold = sum(bold for *_, bold in series) == 1
    for name, labels, scores, bold in series:
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.4f})", **_line_style(bold, single_bold))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set(title=title, xlabel="1 − specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return save_figure(figure, path)


def plot_precision_recall(series, path: Path, title: str = "Precision–recall (out-of-fold)") -> Path:
    """Precision–recall curves of `series` = [(name, labels, scores, bold)], with average precision (AP)."""
    figure, ax = plt.subplots(figsize=(5.5, 5.2))
    single_bold = sum(bold for *_, bold in series) == 1
    for name, labels, scores, bold in series:
        precision, recall, _ = precision_recall_curve(labels, scores)
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(labels, scores):.4f})",
                **_line_style(bold, single_bold))
    prevalence = np.mean(series[-1][1])
    ax.axhline(prevalence, linestyle="--", color="grey", linewidth=0.8, label=f"chance ({prevalence:.1%} positive)")
    ax.set(title=title, xlabel="recall (sensitivity)", ylabel="precision", xlim=(-0.01, 1.01), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return save_figure(figure, path)


def plot_confusion_matrices(points: list[OperatingPoint], path: Path) -> Path:
    """One confusion matrix per operating point, titled with its threshold, sensitivity and specificity."""
    figure, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.6))
    for ax, point in zip(np.atleast_1d(axes), points):
        ConfusionMatrixDisplay(point.matrix, display_labels=["no tumour", "tumour"]).plot(
            ax=ax, colorbar=False, values_format=",d", cmap="Blues")
        ax.set_title(f"{point.rule}\nt = {point.threshold:.4g}: sens {point.sensitivity:.3f}, "
                     f"spec {point.specificity:.3f}", fontsize="medium")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_calibration(labels, scores, path: Path) -> Path:
    """Reliability diagram (observed tumour share per predicted-probability bin) over a histogram of the scores."""
    observed, predicted = calibration_curve(labels, scores, n_bins=CALIBRATION_BINS, strategy="uniform")
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, height_ratios=(3, 1.3))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="perfectly calibrated")
    top.plot(predicted, observed, marker="o", color="black", label="out-of-fold")
    top.set(title=f"Calibration (Brier score {brier_score_loss(labels, scores):.4f})",
            ylabel="observed share with tumour", ylim=(-0.01, 1.01))
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    labels = np.asarray(labels)
    bins = np.linspace(0, 1, 2 * CALIBRATION_BINS + 1)
    for label, name in enumerate(CLASS_NAMES):
        bottom.hist(np.asarray(scores)[labels == label], bins=bins, alpha=0.6, label=name)
    bottom.set(xlabel="predicted probability", ylabel="patches", yscale="log")
    bottom.legend(fontsize="small")
    return save_figure(figure, path)


def plot_mistakes(rows: list[tuple[str, pd.DataFrame, list[np.ndarray]]], path: Path,
                  maps: list[list[np.ndarray]] | None = None) -> Path:
    """A gallery: one row per kind (title, its OOF rows, their images), id and score above each patch, the centre
    32×32 that decides the label outlined. With `maps` (one list per row, one map per patch in [0, 1]) each map is
    laid over its patch, and the share of that patch's evidence inside the centre is written under the score."""
    columns = max(1, max(len(frame) for _, frame, _ in rows))
    row_height = 2.1 if maps is None else 2.4           # a third caption line: the patch's centre share
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.7 * columns, row_height * len(rows)), squeeze=False)
    for index, (axes_row, (title, frame, images)) in enumerate(zip(axes, rows)):
        row_maps = maps[index] if maps is not None else [None] * len(frame)
        shares = centre_shares(np.asarray(row_maps)) if maps is not None and len(frame) else [None] * len(frame)
        for ax in axes_row:
            ax.axis("off")
        axes_row[0].set_title(title, loc="left", fontsize="medium", pad=30 if maps is not None else 22)
        if frame.empty:
            axes_row[0].text(0.0, 0.5, "none", transform=axes_row[0].transAxes)
        for ax, (_, row), image, evidence, share in zip(axes_row, frame.iterrows(), images, row_maps, shares):
            ax.imshow(image)
            caption = f"{row['id'][:8]}\np = {row['pred']:.3f}"
            if evidence is not None:
                ax.imshow(evidence, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
                caption += "\ncentre —" if np.isnan(share) else f"\ncentre {share:.0%}"
            ax.add_patch(Rectangle((CENTRE_START - 0.5, CENTRE_START - 0.5), CENTRE_SIZE, CENTRE_SIZE, fill=False,
                                   edgecolor="white" if evidence is not None else "yellow", linewidth=1.2))
            ax.text(0.5, 1.02, caption, transform=ax.transAxes, ha="center", va="bottom", fontsize="x-small",
                    family="monospace")
    figure.tight_layout()
    return save_figure(figure, path)


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


def headline(run: RunFolder, aucs: AucSummary, accuracy: float, points: list[OperatingPoint]) -> list[str]:
    """The lines printed by `make report` and shown at the top of the page."""
    lines = [f"{run.name}: OOF ROC AUC {aucs.overall:.4f} ({_folds_line(run)}; per fold {aucs.mean:.4f} ± "
             f"{aucs.std:.4f}), accuracy at {DEFAULT_THRESHOLD:g} {accuracy:.4f}"]
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
    plot_mistakes(rows, out / MISTAKES)
    return MISTAKES, (f"The most confident mistakes at threshold {DEFAULT_THRESHOLD:g}, from `{image_dir}`; "
                      f"the yellow square is the centre {CENTRE_SIZE}×{CENTRE_SIZE} that decides the label.")


# ----------------------------------------------------------------------------------------------------------------
# Where the model looks
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class CentreEvidence:
    """The share of the models' evidence for tumour inside the centre 32×32, over a sample of each fold's
    validation patches called tumour (kit/saliency.py), and the maps of the gallery's patches."""
    share: float                          # pooled over every fold's sample (NaN: no evidence anywhere)
    per_fold: dict[int, tuple[int, float]]   # fold → (patches in its sample, its share)
    layer: str                            # where the maps are read, in the first fold's model
    gallery_maps: dict[str, list[np.ndarray]]   # gallery row title → one map per patch

    @property
    def images(self) -> int:
        return sum(count for count, _ in self.per_fold.values())

    @property
    def shown(self) -> str:
        return _three_places(self.share)

    def line(self) -> str:
        """The summary's line."""
        return (f"centre evidence share {self.shown} (over {self.images:,} validation patches called tumour; "
                f"a flat map gives {UNIFORM_CENTRE_SHARE:.3f})")


def _three_places(share: float) -> str:
    """A share to three decimals, or "none" when the maps hold no evidence (or there are no maps)."""
    return "none" if np.isnan(share) else f"{share:.3f}"


def _fold_model(cfg: Config, fold: int):
    """Fold `fold`'s best.pt as a model, or one line saying why it is none."""
    path = fold_dir(cfg, fold) / BEST
    try:
        model, _ = model_from_best(path)
    except KitError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise KitError(f"{path} does not rebuild a model ({type(err).__name__}: {err}); retrain fold {fold} "
                       f"(`make train FOLD={fold} FORCE=1`)") from None
    return model


def _read_images(image_dir: Path, ids) -> np.ndarray:
    return np.stack([read_image(path) for path in image_paths(image_dir, ids)])


def centre_evidence(cfg: Config, run: RunFolder, images_per_fold: int = SALIENCY_IMAGES,
                    gallery: dict[str, pd.DataFrame] | None = None) -> CentreEvidence:
    """Class-activation maps of up to `images_per_fold` validation patches per fold that its best.pt calls tumour
    (at the default threshold), each fold's model on its own held-out patches; plus the maps of the `gallery`'s
    patches (title → OOF rows). Raises KitError saying why when there can be none (no images, no grad-cam, …)."""
    if images_per_fold <= 0:
        raise KitError("--saliency-images 0 leaves the maps out")
    hirescam_class()                                  # grad-cam missing: say so before loading any model
    image_dir = Path(cfg.data_dir) / TRAIN_DIR
    if not image_dir.is_dir():
        raise KitError(f"the training images are not available ({image_dir} not found)")
    sample = share_sample(run.oof, images_per_fold, DEFAULT_THRESHOLD)
    gallery = gallery or {}
    device = select_device(cfg.device)
    folds = sorted(set(sample["fold"]).union(*(set(frame["fold"]) for frame in gallery.values())))
    per_fold, sample_maps, layer = {}, [], ""
    gallery_maps = {title: [None] * len(frame) for title, frame in gallery.items()}
    for fold in folds:
        model = _fold_model(cfg, int(fold))
        if not layer:
            found, _ = target_layer(model)
            layer = next(name for name, module in model.named_modules() if module is found)

        rows = sample[sample["fold"] == fold]
        if len(rows):
            maps = evidence_maps(model, _read_images(image_dir, rows["id"]), device)
            per_fold[int(fold)] = (len(rows), centre_share(maps))
            sample_maps.append(maps)
        for title, frame in gallery.items():
            own = np.flatnonzero(frame["fold"].to_numpy() == fold)
            if len(own):
                maps = evidence_maps(model, _read_images(image_dir, frame["id"].iloc[own]), device)
                for position, evidence in zip(own, maps):
                    gallery_maps[title][position] = evidence
    share = centre_share(np.concatenate(sample_maps)) if sample_maps else float("nan")
    return CentreEvidence(share, per_fold, layer, gallery_maps)


def confident_hits(oof: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """True positives at `threshold`, highest score first."""
    return oof[(oof["label"] == 1) & (oof["pred"] >= threshold)].sort_values("pred", ascending=False, kind="stable")


def _saliency(cfg: Config, run: RunFolder, gallery: dict[str, pd.DataFrame], out: Path, images_per_fold: int
              ) -> tuple[CentreEvidence | None, str | None, str]:
    """The centre evidence and its gallery: (evidence, figure file or None, a paragraph saying what the numbers
    are), or (None, None, why there are none)."""
    (out / SALIENCY).unlink(missing_ok=True)      # never leave an earlier run's maps beside this report
    try:
        evidence = centre_evidence(cfg, run, images_per_fold, gallery)
    except KitError as err:
        return None, None, str(err)
    note = (f"Class-activation maps (HiResCAM, from the grad-cam package) of the tumour logit, read at "
            f"`{evidence.layer}` and upsampled to 96×96, over up to {images_per_fold} validation patches per fold "
            f"that the fold's best.pt calls tumour (p ≥ {DEFAULT_THRESHOLD:g}), each patch seen by the fold that "
            f"held it out (`--saliency-images` sets how many; 0 leaves the maps out). The share is the maps' mass "
            f"inside the centre {CENTRE_SIZE}×{CENTRE_SIZE}, which alone decides the label, over their whole mass: "
            f"{UNIFORM_CENTRE_SHARE:.3f} (32²/96²) for a map spread evenly, lower for a model that finds its "
            f"evidence in the outer ring.")
    if not any(len(frame) for frame in gallery.values()):
        return evidence, None, note
    image_dir = Path(cfg.data_dir) / TRAIN_DIR
    rows = [(title, frame, list(_read_images(image_dir, frame["id"])) if len(frame) else [])
            for title, frame in gallery.items()]
    plot_mistakes(rows, out / SALIENCY, maps=[evidence.gallery_maps[title] for title in gallery])
    return evidence, SALIENCY, note


def write_report(cfg: Config, target_sensitivity: float, gallery_size: int = GALLERY_SIZE,
                 saliency_images: int = SALIENCY_IMAGES, log=print) -> Path:
    """Write runs/<experiment>/report.md and its figures; log the headline numbers; return the page's path."""
    run = read_run_folder(cfg)
    out = run.directory
    labels, scores = run.oof["label"].to_numpy(), run.oof["pred"].to_numpy()
    test_scores, test_note = _test_prediction(cfg)
    aucs = auc_summary(run.oof)
    classes = classification_table(labels, scores)
    points = operating_points(labels, scores, target_sensitivity, test_scores)
    best_epochs = {fold: metrics.get("best_epoch") for fold, metrics in run.fold_metrics.items()}

    curves = _curve_series(run.oof)
    plot_roc(curves, out / ROC)
    plot_precision_recall(curves, out / PRECISION_RECALL)
    plot_confusion_matrices(points, out / CONFUSION_MATRICES)
    plot_calibration(labels, scores, out / CALIBRATION)
    if run.histories:
        plot_training_curves(run.histories, best_epochs, out / TRAINING_CURVES)
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
    lines = headline(run, aucs, classes.attrs["accuracy"], points) + [f"  {looks}"]
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
             "", f"![ROC curves, per fold and pooled]({ROC})", "",
             f"![Precision–recall curves, per fold and pooled]({PRECISION_RECALL})", ""]

    class_rows = [[name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1-score']:.4f}",
                   f"{int(row['support']):,}"] for name, row in classes.iterrows()]
    page += [f"## Classification report at threshold {DEFAULT_THRESHOLD:g}", "",
             f"Accuracy {classes.attrs['accuracy']:.4f}. Recall of the tumour class is the sensitivity, recall of "
             f"the other the specificity.", "",
             markdown_table(["class", "precision", "recall", "F1", "patches"], class_rows), ""]

    point_rows = [[point.rule, f"{point.threshold:.4g}", f"{point.tp:,}", f"{point.fn:,}", f"{point.fp:,}",
                   f"{point.tn:,}", f"{point.sensitivity:.4f}", f"{point.specificity:.4f}", f"{point.precision:.4f}",
                   _share(point.positive_share), _share(point.test_positive_share)] for point in points]
    page += ["## Thresholds", "",
             f"Chosen on the OOF predictions: the seed's {DEFAULT_THRESHOLD:g}, maximal Youden J (sensitivity + "
             f"specificity − 1), maximal F1 of the tumour class, and the highest threshold that keeps "
             f"sensitivity ≥ {target_sensitivity:g} (`TARGET_SENSITIVITY=`). \"Called positive\" is the share of patches at or "
             f"above the threshold.", "", test_note, "",
             markdown_table(["rule", "threshold", "TP", "FN", "FP", "TN", "sensitivity", "specificity", "precision",
                             "OOF called positive", "test called positive"], point_rows), "",
             f"![Confusion matrices at each threshold]({CONFUSION_MATRICES})", ""]

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
        share_rows = [[fold, f"{count:,}", _three_places(share)]
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
                     log=print) -> Path:
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
        classes = classification_table(labels, scores)
        default, youden, _, sensitive = operating_points(labels, scores, target_sensitivity)
        own_report = run.directory / "report.md"
        name = (f"[{run.name}]({os.path.relpath(own_report, out)})" if own_report.is_file() else run.name)
        rows.append([name, _folds_line(run), f"{aucs.overall:.4f}", f"{aucs.mean:.4f} ± {aucs.std:.4f}",
                     f"{classes.attrs['accuracy']:.4f}", f"{default.sensitivity:.4f} / {default.specificity:.4f}",
                     f"{youden.threshold:.4g} ({youden.sensitivity:.4f} / {youden.specificity:.4f})",
                     f"{sensitive.threshold:.4g} ({sensitive.specificity:.4f})"])
        try:
            evidence = centre_evidence(cfg, run, saliency_images)
            rows[-1].append(f"{evidence.shown} ({evidence.images:,})")
            share = f", centre evidence share {evidence.shown}"
        except KitError as err:
            rows[-1].append("—")
            notes.append(f"- `{run.name}`: no centre evidence share: {err}.")
            share = ""
        lines.append(f"{run.name}: OOF ROC AUC {aucs.overall:.4f} ({_folds_line(run)}; per fold {aucs.mean:.4f} ± "
                     f"{aucs.std:.4f}), accuracy at {DEFAULT_THRESHOLD:g} {classes.attrs['accuracy']:.4f}, "
                     f"specificity at sensitivity ≥ {target_sensitivity:g} {sensitive.specificity:.4f}{share}")
        if run.missing:
            notes.append(f"- `{run.name}`: {_missing_folds(run)}.")
        if run.epochs_note:
            notes.append(f"- {run.epochs_note}.")

    plot_roc([(run.name, run.oof["label"].to_numpy(), run.oof["pred"].to_numpy(), True) for run in runs], out / ROC,
             title="ROC (pooled out-of-fold)")
    headers = ["experiment", "folds", "OOF ROC AUC", "per fold mean ± std", f"accuracy at {DEFAULT_THRESHOLD:g}",
               f"sensitivity / specificity at {DEFAULT_THRESHOLD:g}",
               "max Youden J: threshold (sensitivity / specificity)",
               f"sensitivity ≥ {target_sensitivity:g}: threshold (specificity)",
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
