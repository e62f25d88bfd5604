"""Progress bars and log lines, one way for the whole kit: tqdm with the kit's settings, and `say` for every line the
kit prints, so that a line never shares a row with a bar. Bars are drawn where someone watches them (a terminal, a
notebook), not into a CI log or a pipe; `TQDM_DISABLE=1` hides them everywhere (fold-parallel workers get it: their
logs keep the epoch lines, not a bar redrawn per batch)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm


def bars_drawn() -> bool:
    """A terminal or a notebook shows bars; a CI log or a pipe would fill with one redrawn per batch."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return False
    return "ipykernel" in sys.modules or sys.stderr.isatty()


def progress_bar(iterable=None, hidden: bool = False, **options) -> tqdm:
    """tqdm over `iterable` (or with `total=`), redrawn at most twice a second; `hidden`, or nobody watching
    (`bars_drawn`): no bar."""
    return tqdm(iterable, disable=hidden or not bars_drawn(), **{"dynamic_ncols": True, "mininterval": 0.5, **options})


def say(line) -> None:
    """One line of the kit's log on stdout, above any bar being drawn (tqdm clears the bars, writes the line and
    draws them again below it): the `log` every function of the kit defaults to."""
    tqdm.write(str(line), file=sys.stdout)
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------------
# Time, before it is spent
# ----------------------------------------------------------------------------------------------------------------

KAGGLE_SESSION_HOURS = 12      # a Kaggle notebook session (interactive or committed) ends after 12 hours
FIRST_STEPS, FIRST_SECONDS = 50, 20.0     # the fold's estimate comes once this many steps, or seconds, are measured
EVAL_SPEEDUP = 3.0             # before the first validation: a forward pass ≈ a third of a training step


def duration(seconds: float) -> str:
    """A duration for people: 4.2 s, 45 s, 12.5 min, 3.2 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def process_seconds() -> float:
    """Seconds since this Python process started (a Kaggle session's clock starts with its kernel); 0 where the
    start time cannot be read (not Linux)."""
    try:
        ticks = float(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class FoldWork:
    """What is left of a fold when its epochs start (a resumed fold has fewer epochs left)."""
    epochs_left: int
    epochs: int                  # the fold's whole run (what a later fold of the experiment trains)
    train_images: int            # per epoch, over all processes
    valid_images: int
    tta_views: int               # the out-of-fold pass at the end: each held-out image once per view
    swa: bool = False            # the end also recomputes BatchNorm statistics over the training images
    folds_after: int = 0         # folds of the experiment still to train after this one (train-all)


class FoldClock:
    """Times a fold's training steps and validation passes; once its first ~50 steps (or 20 s) are measured, one
    line: the images/s and the estimate for the epoch, the fold and the folds after it, with a warning in a Kaggle
    notebook when they would outlast the session. Each epoch line then carries the time left for the fold.

    The fold's first timing window (its first `check_every` steps) is left out of the rate: it holds the warm-up
    (allocations, cuDNN's search, torch.compile). Validation passes are timed apart. `clock` is the time source,
    in seconds (`started` is a reading of it); tests give a fake one.
    """

    def __init__(self, work: FoldWork, label: str, log, started: float | None = None,
                 in_kaggle: bool = False, clock=time.perf_counter):
        self.work, self.label, self.log, self.in_kaggle, self.clock = work, label, log, in_kaggle, clock
        self.started = clock() if started is None else started
        self.steps = 0                       # measured steps, warm-up windows included
        self.timed_images, self.timed_seconds = 0, 0.0
        self.warmup = (0, 0.0)                # (images, seconds) of the first window
        self.valid_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self.estimated_fold_seconds: float | None = None
        self.setup_seconds: float | None = None
        self._last: tuple[int, int, float] | None = None     # (steps, images, time) at the epoch's previous check

    # the epoch loop's calls --------------------------------------------------------------------------------------
    def epoch_started(self) -> None:
        now = self.clock()
        if self.setup_seconds is None:       # the fold's first epoch: its first window is the warm-up, not timed
            self.setup_seconds = now - self.started      # building the model and data
            self._last = None
        else:
            self._last = (0, 0, now)

    def on_check(self, steps: int, images: int) -> None:
        """`train_one_epoch` after reading the loss back (the device has caught up): `steps` and `images` so far in
        this epoch, over all processes."""
        now = self.clock()
        if self._last is not None:
            last_steps, last_images, last_time = self._last
            self.timed_images += images - last_images
            self.timed_seconds += now - last_time
        else:                                 # the warm-up window: the rate until a later window is timed
            self.warmup = (images, now - (self.started + (self.setup_seconds or 0.0)))
        self.steps += steps - (self._last[0] if self._last else 0)
        self._last = (steps, images, now)
        if self.estimated_fold_seconds is None and self.timed_seconds > 0 and (
                self.steps >= FIRST_STEPS or now - self.started >= FIRST_SECONDS):
            self.announce(now)

    def validated(self, seconds: float) -> None:
        self.valid_seconds.append(seconds)

    def epoch_ended(self, seconds: float) -> str:
        """The epoch line's tail: the fold's time left, from the measured epochs."""
        self.epoch_seconds.append(seconds)
        left = self.work.epochs_left - len(self.epoch_seconds)
        remaining = left * float(np.mean(self.epoch_seconds)) + self.finish_seconds()
        return f"  fold ~{duration(remaining)} left" if left > 0 else ""

    # the estimate ------------------------------------------------------------------------------------------------
    @property
    def images_per_s(self) -> float:
        """Measured after the warm-up; from the warm-up window itself while it is all there is (a fold of one short
        epoch)."""
        images, seconds = (self.timed_images, self.timed_seconds) if self.timed_seconds > 0 else self.warmup
        return max(images, 1) / max(seconds, 1e-9)

    def validation_seconds(self) -> float:
        """One validation pass: measured when one has run, else from the training rate."""
        if self.valid_seconds:
            return float(np.mean(self.valid_seconds))
        return self.work.valid_images / (self.images_per_s * EVAL_SPEEDUP)

    def finish_seconds(self) -> float:
        """The end of the fold: the out-of-fold pass over every TTA view (and SWA's BatchNorm pass)."""
        swa = self.work.train_images / (self.images_per_s * EVAL_SPEEDUP) if self.work.swa else 0.0
        return self.work.tta_views * self.validation_seconds() + swa

    def estimate(self, now: float) -> dict:
        """Seconds: one epoch, this fold from its start to its end (and what is left of it), the folds after it
        (each a whole run, its setup included)."""
        epoch = self.work.train_images / self.images_per_s + self.validation_seconds()
        this_epoch_so_far = (self._last[1] if self._last else 0) / self.images_per_s
        left = max(0.0, (self.work.epochs_left - len(self.epoch_seconds)) * epoch - this_epoch_so_far
                   + self.finish_seconds())
        later = self.work.folds_after * ((self.setup_seconds or 0.0) + self.work.epochs * epoch
                                         + self.finish_seconds())
        return {"epoch": epoch, "fold": (now - self.started) + left, "fold_left": left, "later_folds": later}

    def announce(self, now: float) -> None:
        times = self.estimate(now)
        self.estimated_fold_seconds = times["fold"]
        later = (f", the {self.work.folds_after} fold(s) after it ~{duration(times['later_folds'])}"
                 if self.work.folds_after else "")
        self.log(f"{self.label}: {self.images_per_s:,.0f} img/s over the first {self.steps} steps: epoch "
                 f"~{duration(times['epoch'])}, fold ~{duration(times['fold'])} ({duration(times['fold_left'])} "
                 f"left){later}")
        if self.in_kaggle:
            session_left = KAGGLE_SESSION_HOURS * 3600 - process_seconds()
            needed = times["fold_left"] + times["later_folds"]
            if needed > session_left:
                self.log(f"warning: at this pace the training needs ~{duration(needed)} more, but the Kaggle "
                         f"session ends in ~{duration(max(0.0, session_left))} ({KAGGLE_SESSION_HOURS} h per "
                         f"session) and what is not yet in /kaggle/working goes with it: lower `epochs` or "
                         f"`folds.n_splits`, or train fewer folds now (api.train(cfg, fold)) and keep them "
                         f"(api.keep_outputs) before the session ends")


class FoldsBar:
    """`train-all`'s bar over the experiment's folds with the time left, from the folds this run has trained (`workers`
    at a time under PARALLEL). Drawn once the first of them has finished: until then each fold's own estimate says
    how long it takes, and an error in the first fold stays one line."""

    def __init__(self, name: str, folds: int, pending: int, workers: int = 1, hidden: bool = False):
        self.name, self.folds, self.pending, self.workers, self.hidden = name, folds, pending, workers, hidden
        self.fold_seconds: list[float] = []
        self.bar: tqdm | None = None

    def fold_done(self, seconds: float) -> None:
        self.fold_seconds.append(seconds)
        left_folds = self.pending - len(self.fold_seconds)
        if self.bar is None:
            if left_folds <= 0:
                return
            self.bar = progress_bar(total=self.folds, initial=self.folds - self.pending, desc=f"{self.name} folds",
                                    unit="fold", leave=False, hidden=self.hidden,
                                    bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}|{postfix}")   # tqdm writes the postfix as ", …"
        waves = -(-left_folds // self.workers)           # rounds of `workers` folds still to run
        self.bar.set_postfix_str(f"~{duration(waves * float(np.mean(self.fold_seconds)))} left" if left_folds
                                 else "done", refresh=False)
        self.bar.update(1)
        self.bar.refresh()          # a fold's end is rare: draw it now (tqdm skips draws within mininterval)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
