"""What a newcomer reads: a fold trained in a pseudo-terminal shows its bars and its log lines on rows of their own
(one writer keeps them apart); without a terminal (a CI log, a pipe) there are no bars at all."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest

from conftest import REPO

BAR = "%|"          # tqdm's bar: "  40%|████      | 4/10 …"


def visible_rows(output: str) -> list[str]:
    """The rows a terminal shows: within a row, each carriage return starts overwriting from the left."""
    rows = []
    for line in output.replace("\r\n", "\n").split("\n"):
        row = ""
        for segment in line.split("\r"):
            segment = segment.replace("\x1b[A", "")       # tqdm's cursor-up, when it redraws several bars
            row = segment + row[len(segment):]
        rows.append(row.rstrip())
    return rows


def fold_command(demo_data, tmp_path) -> list[str]:
    """train-all over 2 folds: the folds bar stays drawn below every fold's lines; 32 steps an epoch, so the fold's
    time estimate (after 50 steps) is logged while an epoch's bar is drawn."""
    return [sys.executable, "-m", "kit", "train-all", "--config", "configs/demo.yaml", "--data-dir", str(demo_data),
            "--out", str(tmp_path / "runs"), "epochs=2", "folds.n_splits=2", "max_train_images=64", "tta.views=hflip",
            "batch_size=2"]


def quiet_environment() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("TQDM_DISABLE", "PYTEST_XDIST_WORKER")}
    env.update(COLUMNS="100", LINES="40", TERM="xterm", OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_in_a_terminal_no_log_line_shares_a_row_with_a_progress_bar(demo_data, tmp_path):
    import pty

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))    # 40 rows × 100 columns
    process = subprocess.Popen(fold_command(demo_data, tmp_path), cwd=REPO, stdin=secondary, stdout=secondary,
                               stderr=secondary, env=quiet_environment(), close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:              # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=600) == 0
    output = b"".join(chunks).decode(errors="replace")
    assert BAR in output, "a terminal shows progress bars"
    rows = visible_rows(output)
    logged = [row for row in rows if "train_loss" in row or "valid images" in row or row.startswith("input:")
              or "done, best val AUC" in row or " left" in row and "%|" not in row[:20]]
    assert len(logged) >= 8, rows
    for row in logged:
        assert BAR not in row, f"a log line shares its row with a bar: {row!r}"
    epoch_rows = [row for row in rows if "train_loss" in row]
    assert len(epoch_rows) == 4 and all(re.match(r"fold [01] epoch [12]/2: ", row) for row in epoch_rows), epoch_rows


def test_without_a_terminal_there_are_no_bars_only_lines(demo_data, tmp_path):
    one_short_fold = [sys.executable, "-m", "kit", "train", "--fold", "0", "--config", "configs/demo.yaml",
                      "--data-dir", str(demo_data), "--out", str(tmp_path / "runs"), "epochs=1", "folds.n_splits=2",
                      "max_train_images=32", "tta.views=hflip"]
    result = subprocess.run(one_short_fold, cwd=REPO, capture_output=True, text=True, env=quiet_environment(),
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert BAR not in result.stdout + result.stderr, "a CI log gets no bars redrawn per batch"
    assert sum("train_loss" in line for line in result.stdout.splitlines()) == 1
