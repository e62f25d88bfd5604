"""Out-of-fold metrics: ROC AUC pooled and per fold, thresholds and their operating points, the seed's
classification table, the most confident mistakes. Pure functions of labels and scores (scikit-learn underneath)
that the report's figures and page are built from, and that tests call directly.

A threshold t calls a patch positive when its probability is ≥ t, which is scikit-learn's convention for its curves,
so a threshold read off a curve reproduces that curve's point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

DEFAULT_THRESHOLD = 0.5          # the seed notebook's cut-off
CLASS_NAMES = ("no tumour (0)", "tumour (1)")
CHOSEN_RULE = "max Youden J"     # the operating point the report leads with: see `chosen_point`
NOISE_STANDARD_ERRORS = 2        # pooled and per-fold AUC disagree when they differ by more than this many SEs


def roc_auc_or_nan(labels, scores) -> float:
    """ROC AUC, or NaN when only one class is present (a tiny fold), instead of scikit-learn's exception."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's (1982) standard error of a ROC AUC measured on `positives` and `negatives` patches."""
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc ** 2) + (negatives - 1) * (q2 - auc ** 2))
    return float(np.sqrt(max(variance, 0.0) / max(1, positives * negatives)))


@dataclass
class AucSummary:
    """ROC AUC pooled over the folds and per fold. The pooled AUC orders every (tumour, no tumour) pair; those
    pairs split into pairs within one fold (what the folds' own AUCs measure) and pairs across two folds (where
    the folds' score scales meet)."""
    overall: float                 # the pooled out-of-fold predictions
    per_fold: dict[int, float]
    within_folds: float = float("nan")    # AUC over the pairs whose two patches share a fold
    across_folds: float = float("nan")    # AUC over the pairs from two different folds (NaN: one fold)
    noise: float = 0.0                    # NOISE_STANDARD_ERRORS standard errors of the pooled AUC

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_fold.values())))

    @property
    def std(self) -> float:
        """Population standard deviation over folds (numpy's default), so one fold gives 0 rather than NaN."""
        return float(np.std(list(self.per_fold.values())))

    @property
    def folds_disagree(self) -> bool:
        """The folds' own AUCs and the pooled one differ by more than noise: the folds' scores are on different
        scales (calibrated differently), so pooling mixes them."""
        return bool(abs(self.within_folds - self.overall) > self.noise)


def auc_summary(oof: pd.DataFrame) -> AucSummary:
    """ROC AUC of the pooled OOF predictions and of each fold (`oof` has columns label, pred, fold), and the
    pooled AUC's pairs split into those within a fold and those across folds."""
    per_fold = {int(fold): roc_auc_or_nan(rows["label"], rows["pred"]) for fold, rows in oof.groupby("fold")}
    overall = roc_auc_or_nan(oof["label"], oof["pred"])
    positives, negatives = int((oof["label"] == 1).sum()), int((oof["label"] == 0).sum())
    fold_pairs = {int(fold): int((rows["label"] == 1).sum()) * int((rows["label"] == 0).sum())
                  for fold, rows in oof.groupby("fold")}
    within_pairs, all_pairs = sum(fold_pairs.values()), positives * negatives
    # an AUC is the share of pairs ordered right (ties half), so the pooled count minus the folds' is the rest
    within_right = sum(per_fold[fold] * pairs for fold, pairs in fold_pairs.items() if pairs)
    within = within_right / within_pairs if within_pairs else float("nan")
    across = ((overall * all_pairs - within_right) / (all_pairs - within_pairs) if all_pairs > within_pairs
              else float("nan"))
    noise = NOISE_STANDARD_ERRORS * auc_standard_error(overall, positives, negatives)
    return AucSummary(overall, per_fold, within, across, noise)


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


# ----------------------------------------------------------------------------------------------------------------
# Thresholds and operating points
# ----------------------------------------------------------------------------------------------------------------

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
             (CHOSEN_RULE, youden_threshold(labels, scores)),
             ("max F1", max_f1_threshold(labels, scores)),
             (f"sensitivity ≥ {target_sensitivity:g}", sensitivity_threshold(labels, scores, target_sensitivity))]
    return [operating_point(labels, scores, threshold, rule, test_scores) for rule, threshold in rules]


def chosen_point(points: list[OperatingPoint]) -> OperatingPoint:
    """The point the report leads with: maximal Youden J, the best balance of sensitivity and specificity chosen on
    the OOF scores. Not 0.5: the loss (pos_weight, focal, label smoothing) moves the scores, so 0.5 is no fixed
    point, and the competition scores ranking (AUC), not one cut-off."""
    return next(point for point in points if point.rule == CHOSEN_RULE)


def distinct_thresholds(points: list[OperatingPoint]) -> list[OperatingPoint]:
    """One point per threshold, in order, its rule naming every rule that chose it ("max Youden J = max F1"): two
    rules that agree make one confusion matrix, not two copies of it."""
    merged: dict[float, OperatingPoint] = {}
    for point in points:
        first = merged.get(point.threshold)
        merged[point.threshold] = point if first is None else dataclasses.replace(
            first, rule=f"{first.rule} = {point.rule}")
    return list(merged.values())


# ----------------------------------------------------------------------------------------------------------------
# The patches behind the numbers
# ----------------------------------------------------------------------------------------------------------------

def confident_mistakes(oof: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD):
    """(false negatives, lowest score first; false positives, highest score first) at `threshold`."""
    false_negatives = oof[(oof["label"] == 1) & (oof["pred"] < threshold)].sort_values("pred", kind="stable")
    false_positives = oof[(oof["label"] == 0) & (oof["pred"] >= threshold)].sort_values("pred", ascending=False,
                                                                                         kind="stable")
    return false_negatives, false_positives


def confident_hits(oof: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """True positives at `threshold`, highest score first."""
    return oof[(oof["label"] == 1) & (oof["pred"] >= threshold)].sort_values("pred", ascending=False, kind="stable")
