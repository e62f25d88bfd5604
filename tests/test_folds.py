import numpy as np
import pandas as pd
import pytest

from kit.config import FoldsConfig
from kit.errors import KitError
from kit.folds import assign_folds, load_split


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": [f"{i:040x}" for i in range(1003)], "label": (rng.random(1003) < 0.4).astype(int)})


def load_or_make_folds(labels, n_splits, seed, folds_dir, groups_csv="", log=print):
    """The fold column `load_split` gives for these loose arguments."""
    return load_split(labels, FoldsConfig(n_splits=n_splits, seed=seed, groups_csv=groups_csv), folds_dir, log=log).folds


def test_folds_are_stratified_disjoint_and_covering(labels):
    folds = assign_folds(labels, n_splits=5, seed=42)
    assert folds["id"].tolist() == labels["id"].tolist()
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    # every id is held out exactly once: disjoint validation parts that cover the data
    assert folds["id"].is_unique and len(folds) == len(labels)
    overall = labels["label"].mean()
    for _, part in folds.groupby("fold"):
        assert abs(len(part) - len(labels) / 5) <= 1
        assert abs(part["label"].mean() - overall) < 0.01


def test_folds_file_is_written_once_and_reused(labels, tmp_path):
    first = load_or_make_folds(labels, 5, 42, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = load_or_make_folds(labels, 5, 42, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(first, again)
    other_seed = load_or_make_folds(labels, 5, 7, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert not np.array_equal(other_seed["fold"], first["fold"])


def test_too_few_images_per_class_is_refused(labels):
    tiny = labels.head(6).assign(label=[0, 0, 0, 0, 1, 1])
    with pytest.raises(KitError, match="label 1 has only 2 patches, one per fold is needed; set folds.n_splits=2"):
        assign_folds(tiny, n_splits=5, seed=0)


def test_grouped_folds_never_split_a_slide(labels, tmp_path):
    rng = np.random.default_rng(1)
    slides = pd.DataFrame({"id": labels["id"], "wsi": [f"slide_{s:02d}" for s in rng.integers(0, 40, len(labels))]})
    ungrouped = slides["id"].iloc[:30]
    slides.iloc[30:].to_csv(tmp_path / "slides.csv", index=False)       # the first 30 ids have no slide
    messages = []
    folds = load_or_make_folds(labels, 5, 42, tmp_path / "folds", groups_csv=str(tmp_path / "slides.csv"),
                               log=messages.append)
    merged = folds.merge(slides.iloc[30:], on="id")
    assert (merged.groupby("wsi")["fold"].nunique() == 1).all(), "a slide landed in two folds"
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds["id"].tolist() == labels["id"].tolist()
    assert "30 of 1,003 ids have no group" in messages[0]
    assert folds.set_index("id").loc[ungrouped, "fold"].nunique() > 1   # singletons are spread, not lumped
    # a different grouping is a different split file, not a stale reuse
    plain = load_or_make_folds(labels, 5, 42, tmp_path / "folds")
    assert len(list((tmp_path / "folds").iterdir())) == 2
    assert not np.array_equal(plain["fold"], folds["fold"])


def test_bad_groups_csv_is_named(labels, tmp_path):
    pd.DataFrame({"patch": labels["id"], "wsi": "a"}).to_csv(tmp_path / "g.csv", index=False)
    with pytest.raises(KitError, match="g.csv: expected two columns, `id` and the group"):
        load_or_make_folds(labels, 5, 42, tmp_path, groups_csv=str(tmp_path / "g.csv"))
    with pytest.raises(KitError, match="not found"):
        load_or_make_folds(labels, 5, 42, tmp_path, groups_csv=str(tmp_path / "missing.csv"))


@pytest.mark.parametrize("positives, advice", [
    (0, r"0 positive patches: training needs at least 2 of each label .* check that the labels are the competition's"),
    (1, r"1 positive patches: training needs at least 2 of each label"),
    (3, r"label 1 has only 3 patches, one per fold is needed; set folds.n_splits=3 or fewer"),
])
def test_labels_that_no_fold_count_can_split_say_what_would_help(labels, positives, advice):
    skewed = labels.head(100).assign(label=[1] * positives + [0] * (100 - positives))
    with pytest.raises(KitError, match=advice) as caught:
        assign_folds(skewed, n_splits=5, seed=0)
    assert "lower folds.n_splits" not in str(caught.value)
