"""How long it will take, said before it is spent: the fold's estimate after its first steps, the bar over the
folds, and the Kaggle session warning."""

import os
import re
import time

import pytest

from kit import api, progress
from kit.progress import KAGGLE_SESSION_HOURS, FoldClock, FoldWork

SECONDS = {"s": 1, "min": 60, "h": 3600}


def seconds_in(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+) (s|min|h)", text).groups()
    return float(number) * SECONDS[unit]


@pytest.mark.slow
def test_the_first_steps_estimate_each_fold_and_the_folds_after_it_within_a_quarter(quick_config, capsys,
                                                                                   monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)          # the bar is drawn
    # 3 epochs of 40 steps (all 160 training patches): the estimate comes in epoch 2, after 50 measured steps, as on
    # the demo data
    cfg = quick_config(epochs=3, batch_size=4, max_train_images=0)
    lines = []
    started = time.perf_counter()
    api.train_all(cfg, log=lambda line: lines.append((time.perf_counter(), line)))
    estimates = [(t, line) for t, line in lines if "img/s over the first" in line]
    done = [t for t, line in lines if ": done, best val AUC" in line]
    assert len(estimates) == 2 and len(done) == 2
    first = re.search(r"fold ~([\d.]+ \w+) \(.*the 1 fold\(s\) after it ~([\d.]+ \w+)", estimates[0][1])
    assert first, estimates[0][1]
    fold_0, fold_1 = done[0] - started, done[1] - done[0]
    # within a quarter on a machine of its own; under `make test`'s workers another test's processes share the
    # cores and change the pace mid-fold (seen: -26%), so there the bound is wider
    within = 0.25 if not os.environ.get("PYTEST_XDIST_WORKER_COUNT") else 0.4
    assert seconds_in(first.group(1)) == pytest.approx(fold_0, rel=within)
    assert seconds_in(first.group(2)) == pytest.approx(fold_1, rel=within)
    assert estimates[0][0] < done[0] - 0.4 * fold_0          # said while most of the fold was still ahead
    # each epoch line but the last says what is left of the fold
    epoch_lines = [line for _, line in lines if re.match(r"fold 0 epoch \d/3:", line)]
    assert [("left" in line) for line in epoch_lines] == [True, True, False]
    # the bar over the folds (stderr), drawn once fold 0 has finished: 1 of 2, the time left from fold 0's
    bar = re.search(r"demo folds: 1/2 \|[^|]*\|, ~([\d.]+ \w+) left", capsys.readouterr().err)
    assert bar and seconds_in(bar.group(1)) == pytest.approx(fold_0, rel=0.05)


def clock_after_a_minute(monkeypatch, in_kaggle: bool, process_hours: float, folds_after: int = 4) -> list[str]:
    """A fold of 10 epochs × 1,000 images at 100 img/s (10 s per epoch), measured over synthetic steps."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(progress, "process_seconds", lambda: process_hours * 3600)
    lines = []
    clock = FoldClock(FoldWork(epochs_left=10, epochs=10, train_images=1000, valid_images=300, tta_views=2,
                               folds_after=folds_after), "exp fold 0", lines.append, in_kaggle=in_kaggle)
    clock.epoch_started()
    for step in range(20, 101, 20):       # 20 steps of 10 images per 2 s; the first window is the warm-up
        now[0] += 2.0 if step > 20 else 5.0
        clock.on_check(step, step * 10)
    return lines


def test_the_estimate_uses_the_rate_after_the_warm_up(monkeypatch):
    lines = clock_after_a_minute(monkeypatch, in_kaggle=False, process_hours=1)
    assert len(lines) == 1
    # 100 img/s (the 5 s warm-up left out): epoch 10 s + validation 300 / 300 img/s; the fold: the 9 s so far, the
    # other 400 images of this epoch, 9 more epochs and 2 TTA views of the held-out images
    assert "100 img/s over the first 60 steps: epoch ~11 s, fold ~1.9 min (1.8 min left)" in lines[0]
    assert "the 4 fold(s) after it ~7.5 min" in lines[0]


def test_a_kaggle_notebook_is_warned_when_the_training_would_outlast_its_session(monkeypatch):
    assert len(clock_after_a_minute(monkeypatch, in_kaggle=True, process_hours=1)) == 1     # ~9 min of 11 h left
    late = clock_after_a_minute(monkeypatch, in_kaggle=True, process_hours=KAGGLE_SESSION_HOURS - 0.1)
    assert len(late) == 2 and late[1].startswith("warning:") and "Kaggle session ends in ~6.0 min" in late[1]
    assert len(clock_after_a_minute(monkeypatch, in_kaggle=False, process_hours=KAGGLE_SESSION_HOURS - 0.1)) == 1


def test_a_fold_of_one_short_epoch_takes_its_rate_from_the_warm_up(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    clock = FoldClock(FoldWork(epochs_left=2, epochs=2, train_images=90, valid_images=30, tta_views=1, swa=True),
                      "exp fold 0", print)
    clock.epoch_started()
    now[0] += 3.0
    clock.on_check(9, 90)                 # the epoch's only read-back: the warm-up window, 30 img/s
    assert clock.images_per_s == pytest.approx(30.0)
    clock.validated(1.0)
    assert clock.epoch_ended(4.0) == "  fold ~6.0 s left"     # one more epoch of 4 s, 1 s of TTA, 1 s of SWA
