"""The evaluation report's figures: each function draws one matplotlib Figure from the out-of-fold numbers
(kit/metrics.py) and returns it, so tests can read what was drawn; `save_figure` writes it as a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    average_precision_score,
    brier_score_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from .competition import CENTRE_SIZE, CENTRE_START
from .io import atomic_path
from .metrics import CLASS_NAMES, OperatingPoint, distinct_thresholds
from .saliency import centre_shares

matplotlib.use("Agg")     # figures go to files: no display needed (servers, notebook kernels, CI)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

FIGURE_DPI = 110
CALIBRATION_BINS = 10
# The ROC's zoomed panel: the top-left corner where Kaggle's scores (AUC 0.95–0.99) are decided
ZOOM_FALSE_POSITIVE_RATE = 0.1       # its right edge
ZOOM_TRUE_POSITIVE_RATE = 0.9        # its bottom edge, lowered when the pooled curve does not get that high
# A gallery tile: 1.9 in is 209 px at FIGURE_DPI, over twice a patch's 96 px, so tissue and map stay readable
TILE_INCHES = 1.9
TILE_GAP_INCHES = 0.2
ROW_TITLE_INCHES = 0.3
CAPTION_LINE_INCHES = 0.17


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a PNG atomically and free the figure."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def training_curves_figure(histories: dict[int, pd.DataFrame], best_epochs: dict[int, int]) -> Figure:
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
    return figure


def curve_series(oof: pd.DataFrame, overall_name: str = "all folds") -> list[tuple[str, np.ndarray, np.ndarray, bool]]:
    """(name, labels, scores, bold) per fold, faint, then the pooled OOF predictions, bold."""
    series = [(f"fold {fold}", rows["label"].to_numpy(), rows["pred"].to_numpy(), False)
              for fold, rows in oof.groupby("fold")]
    return series + [(overall_name, oof["label"].to_numpy(), oof["pred"].to_numpy(), True)]


def _line_style(bold: bool, single_bold: bool) -> dict:
    if not bold:
        return {"linewidth": 1, "alpha": 0.45}
    return {"linewidth": 2.2, "color": "black"} if single_bold else {"linewidth": 2}


def roc_figure(series, title: str = "ROC (out-of-fold)") -> Figure:
    """ROC curves of `series` = [(name, labels, scores, bold)], the legend giving each curve's AUC; beside them the
    same curves in the top-left corner (false-positive rate ≤ 0.1), where models that all score 0.95+ differ."""
    figure, (full, corner) = plt.subplots(1, 2, figsize=(11, 5.2))
    single_bold = sum(bold for *_, bold in series) == 1
    bottom = ZOOM_TRUE_POSITIVE_RATE
    for name, labels, scores, bold in series:
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        style = _line_style(bold, single_bold)
        line, = full.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.4f})", **style)
        corner.plot(fpr, tpr, **(style | {"color": line.get_color()}))
        if bold:           # a weak model: lower the corner's floor (in steps of 0.05) until its curve is in view
            bottom = min(bottom, np.floor(20 * np.interp(ZOOM_FALSE_POSITIVE_RATE / 2, fpr, tpr)) / 20)
    full.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    full.add_patch(Rectangle((0, bottom), ZOOM_FALSE_POSITIVE_RATE, 1 - bottom, fill=False, linestyle=":",
                             edgecolor="grey"))
    full.set(title=title, xlabel="1 − specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
             xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    full.legend(loc="lower right", fontsize="small")
    corner.set(title=f"top-left corner (dotted box): false positive rate ≤ {ZOOM_FALSE_POSITIVE_RATE:g}",
               xlabel="1 − specificity (false positive rate)", xlim=(0, ZOOM_FALSE_POSITIVE_RATE),
               ylim=(bottom, 1.002))
    for ax in (full, corner):
        ax.grid(alpha=0.3)
    return figure


def precision_recall_figure(series, title: str = "Precision–recall (out-of-fold)") -> Figure:
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
    return figure


def confusion_matrices_figure(points: list[OperatingPoint]) -> Figure:
    """One confusion matrix per distinct threshold, titled with the rules that chose it, its sensitivity and
    specificity (rules that pick the same threshold share a panel)."""
    points = distinct_thresholds(points)
    figure, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.6), squeeze=False)
    for ax, point in zip(axes[0], points):
        ConfusionMatrixDisplay(point.matrix, display_labels=["no tumour", "tumour"]).plot(
            ax=ax, colorbar=False, values_format=",d", cmap="Blues")
        ax.set_title(f"{point.rule}\nt = {point.threshold:.4g}: sens {point.sensitivity:.3f}, "
                     f"spec {point.specificity:.3f}", fontsize="medium")
    figure.tight_layout()
    return figure


def calibration_figure(labels, scores) -> Figure:
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
    return figure


def gallery_figure(rows: list[tuple[str, pd.DataFrame, list[np.ndarray]]],
                   maps: list[list[np.ndarray]] | None = None) -> Figure:
    """A gallery: one row per kind that has patches (title, its OOF rows, their images), id and score above each
    TILE_INCHES tile, the centre 32×32 that decides the label outlined. With `maps` (one list per row, one map per
    patch in [0, 1]) each map is laid over its patch, and the share of its evidence inside the centre is written
    under the score. Empty kinds draw no row; the figure is as tall as the rows drawn."""
    drawn = [(row, row_maps) for row, row_maps in zip(rows, maps if maps is not None else [None] * len(rows))
             if len(row[1])]
    caption = CAPTION_LINE_INCHES * (2 if maps is None else 3)      # id, score (and the patch's centre share)
    row_height = ROW_TITLE_INCHES + caption + TILE_INCHES + TILE_GAP_INCHES
    columns = max([len(frame) for (_, frame, _), _ in drawn], default=1)
    width, height = TILE_GAP_INCHES + columns * (TILE_INCHES + TILE_GAP_INCHES), row_height * max(1, len(drawn))
    figure = plt.figure(figsize=(width, height))
    for index, ((title, frame, images), row_maps) in enumerate(drawn):
        top = height - index * row_height
        figure.text(TILE_GAP_INCHES / width, (top - 0.05) / height, title, va="top", fontsize="medium")
        shares = centre_shares(np.asarray(row_maps)) if row_maps is not None else [None] * len(frame)
        for column, ((_, row), image, share) in enumerate(zip(frame.iterrows(), images, shares)):
            left = TILE_GAP_INCHES + column * (TILE_INCHES + TILE_GAP_INCHES)
            bottom = top - row_height + TILE_GAP_INCHES
            ax = figure.add_axes((left / width, bottom / height, TILE_INCHES / width, TILE_INCHES / height))
            ax.axis("off")
            ax.imshow(image)
            text = f"{row['id'][:8]}\np = {row['pred']:.3f}"
            if row_maps is not None:
                ax.imshow(row_maps[column], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
                text += "\ncentre —" if np.isnan(share) else f"\ncentre {share:.0%}"
            ax.add_patch(Rectangle((CENTRE_START - 0.5, CENTRE_START - 0.5), CENTRE_SIZE, CENTRE_SIZE, fill=False,
                                   edgecolor="white" if row_maps is not None else "yellow", linewidth=1.2))
            ax.text(0.5, 1.02, text, transform=ax.transAxes, ha="center", va="bottom", fontsize="small",
                    family="monospace")
    return figure
