"""How long it will take, said before it is spent: the fold's estimate after its first steps, the bar over the
folds, and the Kaggle session warning. Every clock here is a fake one: the numbers are exact."""

import re

import pytest

from kit import api, progress
from kit.progress import KAGGLE_SESSION_HOURS, FoldClock, FoldsBar, FoldWork


class FakeClock:
    """A time source that moves only when the test moves it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class PacedClock(FoldClock):
    """The fold's clock on a fake time source that moves as if its setup took SETUP s, its steps ran at RATE images/s
    and each validation pass took VALIDATION s, whatever the real machine does."""
    SETUP, RATE, VALIDATION = 5.0, 40.0, 2.0

    def __init__(self, work, label, log, started=None, in_kaggle=False):
        self.fake = FakeClock()
        super().__init__(work, label, log, in_kaggle=in_kaggle, clock=self.fake)

    def epoch_started(self):
        if self.setup_seconds is None:
            self.fake.now += self.SETUP
        self.epoch_start, self.seen = self.fake.now, 0
        super().epoch_started()

    def on_check(self, steps, images):
        self.fake.now += (images - self.seen) / self.RATE
        self.seen = images
        super().on_check(steps, images)

    def validated(self, seconds):
        self.fake.now += self.VALIDATION
        super().validated(self.VALIDATION)

    def epoch_ended(self, seconds):
        return super().epoch_ended(self.fake.now - self.epoch_start)


@pytest.mark.slow
def test_the_first_steps_estimate_each_fold_and_the_folds_after_it(quick_config, capsys, monkeypatch):
    """The fold's own calls, timed at 40 img/s, 2 s per validation and 5 s of setup: 3 epochs of 160 images
    (4 s of steps + 2 s of validation each) and the 2 TTA views of the held-out images at the end (4 s)."""
    monkeypatch.setattr(progress, "bars_drawn", lambda: True)          # the bar is drawn, as in a terminal
    monkeypatch.setattr("kit.fold.FoldClock", PacedClock)
    # 3 epochs of 40 steps (all 160 training patches): the estimate comes in epoch 2, after 50 measured steps, as on
    # the demo data
    cfg = quick_config(epochs=3, batch_size=4, max_train_images=0)
    lines = []
    api.train_all(cfg, log=lines.append)
    estimates = [line for line in lines if "img/s over the first" in line]
    # at 60 of the 120 steps (epoch 2's first check; epoch 1's first window is the warm-up): 5 s setup + 6 s epoch 1
    # + 2 s so far; left: 2 epochs of 6 s less the 2 s done, and 4 s of TTA. The fold after it: the whole of one.
    assert estimates == [
        "demo fold 0: 40 img/s over the first 60 steps: epoch ~6.0 s, fold ~27 s (14 s left), the 1 fold(s) after "
        "it ~27 s",
        "demo fold 1: 40 img/s over the first 60 steps: epoch ~6.0 s, fold ~27 s (14 s left)"]
    # each epoch line but the last says what is left of the fold: 2 epochs + TTA, then 1 epoch + TTA
    tails = [re.search(r"(  fold ~.* left)?$", line).group(0) for line in lines if re.match(r"fold 0 epoch \d/3:", line)]
    assert tails == ["  fold ~16 s left", "  fold ~10 s left", ""]
    # the bar over the folds (stderr), drawn once fold 0 has finished: 1 of 2, with the time left
    assert re.search(r"demo folds: 1/2 \|[^|]*\|, ~[\d.]+ (s|min) left", capsys.readouterr().err)


def test_the_bar_over_the_folds_says_the_time_left_in_rounds_of_parallel_folds(capsys, monkeypatch):
    monkeypatch.setattr(progress, "bars_drawn", lambda: True)
    bar = FoldsBar("exp", folds=5, pending=4, workers=2)      # fold 0 trained before; 4 to go, 2 at a time
    shown = []
    for seconds in (40.0, 50.0, 60.0, 70.0):
        bar.fold_done(seconds)
        shown.append(re.findall(r"exp folds: (\d/5) \|[^|]*\|, (~[\d.]+ (?:s|min) left|done)", capsys.readouterr().err)[-1])
    bar.close()
    # 3 folds left after the first (2 rounds of 40 s), 2 (1 round of the mean 45 s), 1 (1 round of 50 s), none
    assert shown == [("2/5", "~80 s left"), ("3/5", "~45 s left"), ("4/5", "~50 s left"), ("5/5", "done")]


def clock_after_a_minute(monkeypatch, in_kaggle: bool, process_hours: float, folds_after: int = 4) -> list[str]:
    """A fold of 10 epochs × 1,000 images at 100 img/s (10 s per epoch), measured over synthetic steps."""
    now = FakeClock()
    monkeypatch.setattr(progress, "process_seconds", lambda: process_hours * 3600)
    lines = []
    clock = FoldClock(FoldWork(epochs_left=10, epochs=10, train_images=1000, valid_images=300, tta_views=2,
                               folds_after=folds_after), "exp fold 0", lines.append, in_kaggle=in_kaggle, clock=now)
    clock.epoch_started()
    for step in range(20, 101, 20):       # 20 steps of 10 images per 2 s; the first window is the warm-up
        now.now += 2.0 if step > 20 else 5.0
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


def test_a_fold_of_one_short_epoch_takes_its_rate_from_the_warm_up():
    now = FakeClock()
    clock = FoldClock(FoldWork(epochs_left=2, epochs=2, train_images=90, valid_images=30, tta_views=1, swa=True),
                      "exp fold 0", print, clock=now)
    clock.epoch_started()
    now.now += 3.0
    clock.on_check(9, 90)                 # the epoch's only read-back: the warm-up window, 30 img/s
    assert clock.images_per_s == pytest.approx(30.0)
    clock.validated(1.0)
    assert clock.epoch_ended(4.0) == "  fold ~6.0 s left"     # one more epoch of 4 s, 1 s of TTA, 1 s of SWA
