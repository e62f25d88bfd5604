"""The evaluation report, on run folders written by hand: no training, so every number is known in advance."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

import kit.figures as figures
import kit.metrics as metrics
import kit.report as report
from kit.cli import main
from kit.config import load_config
from kit.data import read_train_labels
from kit.demo_data import make_demo_data
from kit.errors import KitError
from kit.fold import HISTORY_COLUMNS
from kit.folds import load_split
from kit.runs import BEST, LAST, FoldRun, fold_dir

from conftest import REPO

FIGURES = ["training_curves.png", "roc.png", "precision_recall.png", "confusion_matrices.png", "calibration.png",
           "mistakes.png"]


@pytest.fixture(scope="module")
def gallery_data(tmp_path_factory):
    """40 generated train patches (real TIFFs for the gallery) and 8 test patches."""
    return make_demo_data(tmp_path_factory.mktemp("report") / "data", n_train=40, n_test=8, seed=3)


def oof_predictions(data_dir, seed=0, n_splits=3) -> pd.DataFrame:
    """Noisy but informative scores for the generated ids, split over `n_splits` folds: id, label, pred, fold.
    The first tumour and the first negative are confident mistakes, so the gallery always has both kinds."""
    labels = pd.read_csv(data_dir / "train_labels.csv", dtype={"id": str})
    rng = np.random.default_rng(seed)
    logits = 1.5 * (2 * labels["label"].to_numpy() - 1) + rng.normal(0, 1.5, len(labels))
    oof = labels.assign(pred=1 / (1 + np.exp(-logits)), fold=np.arange(len(labels)) % n_splits)
    oof.loc[oof.index[oof["label"] == 1][0], "pred"] = 0.02
    oof.loc[oof.index[oof["label"] == 0][0], "pred"] = 0.97
    return oof


def experiment(tmp_path, data_dir, name="demo", n_splits=3):
    return load_config(REPO / "configs" / "demo.yaml",
                       {"name": name, "data_dir": str(data_dir), "out_dir": str(tmp_path / "runs"), "epochs": 3,
                        "submissions_dir": str(tmp_path / "submissions"), "folds.n_splits": n_splits})


def write_fold(cfg, fold, oof, finished=True):
    """What the engine leaves in fold<k>/, written through kit/runs.py: config.yaml and run.json, history.csv,
    and (when finished) best.pt, oof.csv and metrics.json."""
    run = FoldRun(cfg, fold)
    run.start_fresh(keep_existing=False)
    has_labels = (Path(cfg.data_dir) / "train_labels.csv").is_file()
    split = load_split(read_train_labels(cfg.data_dir), cfg.folds, Path(cfg.out_dir) / "folds") if has_labels else None
    run.write_identity(split.record if split else {})
    epochs = cfg.epochs if finished else cfg.epochs - 1
    history = pd.DataFrame({"epoch": range(1, epochs + 1), "train_loss": np.linspace(0.7, 0.3, epochs),
                            "val_loss": np.linspace(0.6, 0.4, epochs), "val_auc": np.linspace(0.7, 0.9, epochs),
                            "lr": 1e-3, "images_per_s": 100.0, "seconds": 1.0}, columns=HISTORY_COLUMNS)
    run.write_history(history.to_dict("records"), HISTORY_COLUMNS)
    run.save_checkpoint(LAST, {"epoch": epochs})
    if finished:
        run.save_checkpoint(BEST, {"epoch": epochs})
        run.write_oof(oof)
        run.write_metrics({"fold": fold, "best_epoch": epochs, "epochs_trained": epochs, "stopped_early": False})


def write_run(cfg, oof, unfinished=(), absent=()):
    for fold, rows in oof.groupby("fold"):
        if fold not in absent:
            write_fold(cfg, fold, rows, finished=fold not in unfinished)


def write_test_prediction(cfg, stamp, probabilities) -> Path:
    """A `make predict` output: submissions/<experiment>-<time>.csv and its .json."""
    path = Path(cfg.submissions_dir) / f"{cfg.name}-{stamp}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": [f"t{i}" for i in range(len(probabilities))], "label": probabilities}).to_csv(path, index=False)
    path.with_suffix(".json").write_text(json.dumps({"experiment": cfg.name}))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------------------

def test_numbers_equal_scikit_learns(gallery_data):
    oof = oof_predictions(gallery_data)
    labels, scores = oof["label"].to_numpy(), oof["pred"].to_numpy()

    aucs = metrics.auc_summary(oof)
    assert aucs.overall == pytest.approx(roc_auc_score(labels, scores))
    per_fold = [roc_auc_score(rows["label"], rows["pred"]) for _, rows in oof.groupby("fold")]
    assert list(aucs.per_fold.values()) == pytest.approx(per_fold)
    assert len(set(np.round(per_fold, 6))) > 1, "folds must differ for the mean and std to mean much"
    assert (aucs.mean, aucs.std) == pytest.approx((np.mean(per_fold), np.std(per_fold)))

    table = metrics.classification_table(labels, scores)
    predicted = (scores >= 0.5).astype(int)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted)
    np.testing.assert_allclose(table.iloc[:2][["precision", "recall", "f1-score"]].to_numpy(),
                               np.column_stack([precision, recall, f1]))
    assert table.iloc[:2]["support"].tolist() == support.tolist()
    assert table.attrs["accuracy"] == pytest.approx(accuracy_score(labels, predicted))

    test_scores = np.random.default_rng(1).uniform(0, 1, 50)
    for threshold in (0.5, 0.3, 0.81):
        point = metrics.operating_point(labels, scores, threshold, "t", test_scores)
        tn, fp, fn, tp = confusion_matrix(labels, scores >= threshold).ravel()
        assert (point.tn, point.fp, point.fn, point.tp) == (tn, fp, fn, tp)
        assert point.sensitivity == pytest.approx(tp / (tp + fn))
        assert point.specificity == pytest.approx(tn / (tn + fp))
        assert point.test_positive_share == pytest.approx(np.mean(test_scores >= threshold))


def brute_force_thresholds(labels, scores, target):
    """Every distinct score as a threshold (≥ t is positive), best by each rule; ties go to the higher threshold."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    best = {}
    for t in sorted(set(scores), reverse=True):
        called = scores >= t
        tp, fp = np.sum(called & (labels == 1)), np.sum(called & (labels == 0))
        sensitivity, specificity = tp / np.sum(labels == 1), 1 - fp / np.sum(labels == 0)
        f1 = 2 * tp / (2 * tp + fp + np.sum(~called & (labels == 1)))
        for rule, value in (("youden", sensitivity + specificity - 1), ("f1", f1)):
            if rule not in best or value > best[rule][0] + 1e-12:
                best[rule] = (value, t)
        if "sensitivity" not in best and sensitivity >= target:
            best["sensitivity"] = (sensitivity, t)
    return {rule: t for rule, (_, t) in best.items()}


def test_thresholds_are_chosen_correctly_on_constructed_cases():
    # Youden J: at 0.7 three of four tumours and no false positive (J = 0.75); at 0.4 all tumours but two of five
    # negatives (J = 0.6); everything else is lower
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.65, 0.4, 0.7, 0.8, 0.9]
    assert metrics.youden_threshold(labels, scores) == 0.7
    # a tie (J = 0.75 at 0.7 and at 0.4 once 0.65 is gone) goes to the higher threshold
    assert metrics.youden_threshold(labels[:4] + labels[5:], scores[:4] + scores[5:]) == 0.7

    # F1 by hand, scores falling: 0.9 .33, 0.8 .57, 0.7 .50, 0.6 .67, 0.5 .80, 0.4 .73, 0.3 .67, 0.2 .77, 0.1 .71
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    labels = [1, 1, 0, 1, 1, 0, 0, 1, 0]
    assert metrics.max_f1_threshold(labels, scores) == 0.5
    # a tie: F1 is 2/3 both at 0.9 (one of two tumours, no false positive) and at 0.6 (both, two false positives)
    assert metrics.max_f1_threshold([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6]) == 0.9

    # 20 tumours: sensitivity 0.95 needs 19 of them, so the threshold is the 19th highest tumour score
    rng = np.random.default_rng(0)
    tumour_scores = np.sort(rng.uniform(0.2, 1.0, 20))[::-1]
    labels = np.r_[np.ones(20, int), np.zeros(30, int)]
    scores = np.r_[tumour_scores, rng.uniform(0.0, 0.8, 30)]
    assert metrics.sensitivity_threshold(labels, scores, 0.95) == tumour_scores[18]
    assert metrics.sensitivity_threshold(labels, scores, 0.90) == tumour_scores[17]
    assert metrics.sensitivity_threshold(labels, scores, 0.999) == tumour_scores[19]

    # and on a larger random case, against an exhaustive search
    labels = rng.integers(0, 2, 300)
    scores = np.round(np.clip(0.25 * labels + rng.normal(0.4, 0.2, 300), 0, 1), 3)   # rounding makes ties
    expected = brute_force_thresholds(labels, scores, 0.9)
    assert metrics.youden_threshold(labels, scores) == expected["youden"]
    assert metrics.max_f1_threshold(labels, scores) == expected["f1"]
    assert metrics.sensitivity_threshold(labels, scores, 0.9) == expected["sensitivity"]


def folds_on_two_scales(shifted: bool, patches_per_fold: int = 200, seed: int = 0) -> pd.DataFrame:
    """Two folds of OOF predictions, half tumour. `shifted`: each fold separates its own classes perfectly (AUC 1),
    but fold 1's scores sit higher, its negatives above fold 0's tumours, as two folds calibrated differently do;
    otherwise both folds draw overlapping scores from one distribution."""
    rng = np.random.default_rng(seed)
    frames = []
    for fold in (0, 1):
        labels = np.arange(patches_per_fold) % 2
        if shifted:
            low, high = (0.0, 0.3) if fold == 0 else (0.45, 0.7)
            scores = np.where(labels == 1, rng.uniform(high - 0.15, high, len(labels)) + 0.05,
                              rng.uniform(low, high - 0.2, len(labels)))
        else:
            scores = 1 / (1 + np.exp(-(1.5 * (2 * labels - 1) + rng.normal(0, 1.5, len(labels)))))
        frames.append(pd.DataFrame({"id": [f"f{fold}p{i:03d}" for i in range(len(labels))], "label": labels,
                                    "pred": scores, "fold": fold}))
    return pd.concat(frames, ignore_index=True)


def pair_auc(oof: pd.DataFrame, same_fold: bool) -> float:
    """Share of (tumour, no tumour) pairs ordered right (a tie counts half), over pairs within or across folds."""
    positives, negatives = oof[oof["label"] == 1], oof[oof["label"] == 0]
    right = total = 0.0
    for _, tumour in positives.iterrows():
        others = negatives[(negatives["fold"] == tumour["fold"]) == same_fold]
        right += np.sum(tumour["pred"] > others["pred"]) + 0.5 * np.sum(tumour["pred"] == others["pred"])
        total += len(others)
    return right / total


def test_the_pooled_auc_splits_into_pairs_within_and_across_folds_and_flags_folds_on_two_scales():
    rng = np.random.default_rng(4)
    oof = pd.DataFrame({"label": rng.integers(0, 2, 60), "pred": np.round(rng.uniform(0, 1, 60), 1),
                        "fold": np.arange(60) % 3})                   # rounded: ties count half
    aucs = metrics.auc_summary(oof)
    assert aucs.within_folds == pytest.approx(pair_auc(oof, same_fold=True))
    assert aucs.across_folds == pytest.approx(pair_auc(oof, same_fold=False))

    shifted = metrics.auc_summary(folds_on_two_scales(shifted=True))
    assert list(shifted.per_fold.values()) == [1.0, 1.0] and shifted.within_folds == 1.0
    assert shifted.overall < 0.95 and shifted.across_folds < shifted.overall and shifted.folds_disagree
    agreeing = metrics.auc_summary(folds_on_two_scales(shifted=False))
    assert 0.7 < agreeing.overall < 0.95 and not agreeing.folds_disagree
    # the case: every fold 1.0000, pooled 0.9942 on 220,000 patches, is far beyond noise
    assert metrics.NOISE_STANDARD_ERRORS * metrics.auc_standard_error(0.9942, 90_000, 130_000) < 0.001


def test_newest_test_prediction_of_the_experiment_is_found(tmp_path):
    cfg = experiment(tmp_path, tmp_path / "data")
    write_test_prediction(cfg, "20260101-000000", [0.1])
    newest = write_test_prediction(cfg, "20260102-000000", [0.2])
    other = experiment(tmp_path, tmp_path / "data", name="demo-large")      # same prefix, another experiment
    write_test_prediction(other, "20260103-000000", [0.3])
    assert report.find_test_prediction(cfg.submissions_dir, "demo") == newest
    assert report.find_test_prediction(cfg.submissions_dir, "demo-large").name == "demo-large-20260103-000000.csv"
    assert report.find_test_prediction(tmp_path / "nowhere", "demo") is None


# ----------------------------------------------------------------------------------------------------------------
# The page and its figures
# ----------------------------------------------------------------------------------------------------------------

def test_report_writes_every_figure_and_embeds_it(gallery_data, tmp_path):
    cfg = experiment(tmp_path, gallery_data)
    oof = oof_predictions(gallery_data)
    write_run(cfg, oof)
    write_test_prediction(cfg, "20260101-000000", np.full(8, 0.99))                 # older: ignored
    test_scores = np.linspace(0.05, 0.95, 8)
    write_test_prediction(cfg, "20260102-000000", test_scores)
    false_negatives, false_positives = metrics.confident_mistakes(oof)
    assert len(false_negatives) and len(false_positives), "the gallery needs both kinds of mistake"

    logged = []
    path = report.write_report(cfg, target_sensitivity=0.95, log=logged.append)
    assert path == tmp_path / "runs" / "demo" / "report.md"
    page = path.read_text()
    for name in FIGURES:
        figure = path.parent / name
        assert figure.is_file() and figure.stat().st_size > 1000, name
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in page, f"report.md does not embed {name}"
    assert not list(path.parent.glob(".*.tmp"))

    labels, scores = oof["label"].to_numpy(), oof["pred"].to_numpy()
    auc = roc_auc_score(labels, scores)
    assert f"OOF ROC AUC {auc:.4f}" in logged[0] and f"OOF ROC AUC {auc:.4f}" in page
    assert "3 of 3 folds" in logged[0] and "Missing folds" not in page
    youden = metrics.youden_threshold(labels, scores)
    assert f"max Youden J | {youden:.4g} |" in page
    target = metrics.sensitivity_threshold(labels, scores, 0.95)
    assert any(line.startswith(f"  sensitivity ≥ 0.95: threshold {target:.4g}") for line in logged)
    assert f"{np.mean(test_scores >= 0.5):.1%} |" in page and "demo-20260102-000000.csv" in page
    assert false_negatives["id"].iloc[0] in page and false_positives["id"].iloc[0] in page


def test_the_headline_leads_with_auc_and_the_chosen_thresholds_sensitivity_and_specificity(gallery_data, tmp_path):
    cfg = experiment(tmp_path, tmp_path / "no-data")
    oof = oof_predictions(gallery_data)
    write_run(cfg, oof)
    logged = []
    page = report.write_report(cfg, target_sensitivity=0.95, log=logged.append).read_text()
    labels, scores = oof["label"].to_numpy(), oof["pred"].to_numpy()
    youden = metrics.operating_point(labels, scores, metrics.youden_threshold(labels, scores), "max Youden J")
    first = (f"demo: OOF ROC AUC {roc_auc_score(labels, scores):.4f} (3 of 3 folds; per fold ")
    chosen = (f"at the max Youden J threshold {youden.threshold:.4g}: sensitivity {youden.sensitivity:.4f}, "
              f"specificity {youden.specificity:.4f}")
    assert logged[0].startswith(first) and logged[0].endswith(chosen) and "accuracy" not in logged[0]
    assert page.split("```\n")[1].startswith(first)                  # the page's summary leads the same way
    assert page.index("## Thresholds") < page.index("## The seed's classification report at threshold 0.5")


def test_the_report_says_when_the_folds_and_the_pooled_auc_disagree_and_why(tmp_path):
    notes = {}
    for shifted in (True, False):
        cfg = experiment(tmp_path / str(shifted), tmp_path / "no-data", n_splits=2)
        oof = folds_on_two_scales(shifted)
        write_run(cfg, oof)
        logged = []
        page = report.write_report(cfg, target_sensitivity=0.95, log=logged.append).read_text()
        notes[shifted] = ([line for line in logged if "folds and pooled disagree" in line],
                          "**Folds and pooled disagree:**" in page)
        if shifted:
            pooled = roc_auc_score(oof["label"], oof["pred"])
            assert "| 0 | 200 | 50.0% | 1.0000 |" in page and "| 1 | 200 | 50.0% | 1.0000 |" in page
            assert f"the pooled OOF AUC {pooled:.4f} is below the folds' own (1.0000" in notes[True][0][0]
            assert "calibrated differently, so pooling mixes their scales" in page
    assert len(notes[True][0]) == 1 and notes[True][1]
    assert notes[False] == ([], False)


def test_the_roc_figure_zooms_on_the_top_left_corner():
    oof = folds_on_two_scales(shifted=False, seed=1)
    oof["pred"] = np.where(oof["label"] == 1, oof["pred"] ** 0.05, oof["pred"] ** 8)      # a strong model
    figure = figures.roc_figure(figures.curve_series(oof))
    full, corner = figure.axes
    assert full.get_xlim() == pytest.approx((-0.01, 1.01))
    assert corner.get_xlim() == (0, 0.1) and corner.get_ylim()[0] == pytest.approx(0.9)
    assert len(corner.get_lines()) == len(full.get_lines()) - 1        # every curve, without the diagonal
    figures.plt.close(figure)

    oof = folds_on_two_scales(shifted=False, seed=1)                   # a weak model: the corner widens to show it
    figure = figures.roc_figure(figures.curve_series(oof))
    bottom = figure.axes[1].get_ylim()[0]
    fpr, tpr = figure.axes[1].get_lines()[-1].get_data()
    assert bottom < 0.9 and np.any((fpr <= 0.1) & (tpr > bottom))
    figures.plt.close(figure)


def test_rules_that_pick_the_same_threshold_share_one_confusion_matrix():
    labels, scores = [0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]     # separated: three rules pick 0.7
    points = metrics.operating_points(labels, scores, target_sensitivity=0.95)
    assert [point.threshold for point in points] == [0.5, 0.7, 0.7, 0.7]
    figure = figures.confusion_matrices_figure(points)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 2
    assert titles[1].startswith("max Youden J = max F1 = sensitivity ≥ 0.95\nt = 0.7: sens 1.000, spec 1.000")
    figures.plt.close(figure)


def test_the_mistakes_gallery_draws_no_empty_row_and_readable_tiles(gallery_data):
    oof = oof_predictions(gallery_data)
    false_negatives, _ = metrics.confident_mistakes(oof)
    shown = false_negatives.head(3)
    images = [np.zeros((96, 96, 3), np.uint8)] * len(shown)
    one_row = figures.gallery_figure([("false negatives", shown, images), ("false positives", oof.iloc[:0], [])])
    assert len(one_row.axes) == len(shown)                             # a tile per patch, nothing for no patch
    for ax in one_row.axes:
        tile = ax.get_position()
        assert tile.width * one_row.get_figwidth() * figures.FIGURE_DPI >= 2 * 96       # over twice a patch
        assert tile.height * one_row.get_figheight() * figures.FIGURE_DPI >= 2 * 96
    two_rows = figures.gallery_figure([("false negatives", shown, images), ("false positives", shown, images)])
    assert two_rows.get_figheight() == pytest.approx(2 * one_row.get_figheight())
    figures.plt.close("all")


def test_missing_folds_are_reported_and_left_out(gallery_data, tmp_path):
    cfg = experiment(tmp_path, tmp_path / "no-data", n_splits=4)    # no images: the gallery is skipped
    oof = oof_predictions(gallery_data, n_splits=4)
    write_run(cfg, oof, unfinished=[2], absent=[3])
    stale = fold_dir(cfg, 0).parent / "mistakes.png"
    stale.write_bytes(b"an earlier report's gallery")

    logged = []
    page = report.write_report(cfg, target_sensitivity=0.9, log=logged.append).read_text()
    assert "fold 2 (unfinished, 2 of 3 epochs); fold 3 (not trained)" in page
    assert "pool folds 0, 1 only" in page and "2 of 4 folds" in page
    assert any("missing folds: fold 2" in line for line in logged)
    finished = oof[oof["fold"] < 2]
    assert f"OOF ROC AUC {roc_auc_score(finished['label'], finished['pred']):.4f}" in page
    assert "Gallery skipped" in page and "no-data" in page
    assert not stale.exists() and "mistakes.png" not in page
    assert "No test prediction" in page


def test_side_by_side_writes_one_table_and_one_roc_plot(gallery_data, tmp_path, monkeypatch):
    first, second = experiment(tmp_path, gallery_data), experiment(tmp_path, gallery_data, name="other")
    write_run(first, oof_predictions(gallery_data, seed=0))
    write_run(second, oof_predictions(gallery_data, seed=1), unfinished=[1])
    legends = {}
    save_figure = report.save_figure

    def remember_legend(figure, path):
        legends[path.name] = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
        return save_figure(figure, path)

    monkeypatch.setattr(report, "save_figure", remember_legend)
    path = report.write_comparison([first, second], target_sensitivity=0.95, log=lambda *_: None)
    assert path == tmp_path / "runs" / "compare" / "demo+other" / "report.md"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md", "roc.png"]
    assert (path.parent / "roc.png").stat().st_size > 1000
    page = path.read_text()
    assert page.count("| experiment |") == 1 and "](roc.png)" in page
    for cfg, seed in ((first, 0), (second, 1)):
        oof = oof_predictions(gallery_data, seed=seed)
        oof = oof[oof["fold"] != 1] if cfg is second else oof
        auc = roc_auc_score(oof["label"], oof["pred"])
        assert f"| {cfg.name} | " in page and f"| {auc:.4f} |" in page
        assert f"{cfg.name} (AUC {auc:.4f})" in legends["roc.png"]
    assert "`other`: fold 1 (unfinished" in page

    with pytest.raises(KitError, match="more than once"):
        report.write_comparison([first, first], target_sensitivity=0.95)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def test_cli_prints_the_headline_and_refuses_what_it_cannot_do(gallery_data, tmp_path, capsys):
    cfg = experiment(tmp_path, gallery_data)
    oof = oof_predictions(gallery_data)
    write_run(cfg, oof)
    common = ["--config", "configs/demo.yaml", "--data-dir", str(gallery_data), "--out", cfg.out_dir,
              f"submissions_dir={cfg.submissions_dir}", "epochs=3"]

    assert main(["report", *common, "--target-sensitivity", "0.9"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert f"demo: OOF ROC AUC {roc_auc_score(oof['label'], oof['pred']):.4f}" in out[0]
    assert any(line.startswith("  sensitivity ≥ 0.9: threshold") for line in out)
    assert out[-1] == str(fold_dir(cfg, 0).parent / "report.md")

    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text((REPO / "configs" / "demo.yaml").read_text())      # a copy: named `other` by its file
    write_run(experiment(tmp_path, gallery_data, name="other"), oof_predictions(gallery_data, seed=1))
    assert main(["report", *common, "--exps", f"demo, {other_yaml}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("demo: OOF ROC AUC") and out[1].startswith("other: OOF ROC AUC")
    assert out[-1].endswith("compare/demo+other/report.md")

    unfinished = experiment(tmp_path / "unfinished", gallery_data)
    write_fold(unfinished, 0, oof, finished=False)
    for argv, message in ((["--out", str(tmp_path / "empty")],
                           "does not exist; run `make train-all CONFIG=configs/demo.yaml` first"),
                          (["--out", unfinished.out_dir, "--data-dir", str(gallery_data), "epochs=3"],
                           "no finished fold of `demo`"),
                          (["--target-sensitivity", "1.5"], "between 0 and 1")):
        assert main(["report", "--config", "configs/demo.yaml", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
