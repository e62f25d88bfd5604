"""`make gpu-check` (kit/gpu_check.py) on the CPU: every step end to end, its budget and rows, a run cut off, the
rows' meaning (compile seconds, T4 fit, failed correctness checks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

CPU = torch.device("cpu")
KAGGLE_TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CARDS = {(6, 0): "Tesla P100-PCIE-16GB", (7, 5): "Tesla T4", (8, 0): "NVIDIA A100-SXM4-40GB",
         (8, 9): "NVIDIA L4", (9, 0): "NVIDIA H100 80GB HBM3"}


def test_the_t4_line_comes_from_the_measured_peaks_with_the_competition_split_in_place_of_the_checks():
    from kit.gpu_report import format_report, summary

    def epoch(config, precision, peak, tta_peak, **extra):
        return {"kind": "epoch", "config": config, "precision": precision, "compiled": False, "status": "ok",
                "batch_size": 128, "train_images_per_s": 1000.0, "epoch_seconds": 40.0, "peak_memory_mb": peak,
                "tta_peak_memory_mb": tta_peak, "resident_split_mb": 1318.0, "val_auc": 0.9, **extra}

    rows = [{"kind": "header", "card": "NVIDIA H200", "torch": "2.11", "cuda": "12.8", "kit_precision": "bf16",
             "images": 50_000, "minutes": 7},
            epoch("baseline_bn", "auto", 3000.0, 2000.0), epoch("baseline_bn", "fp16", 2500.0, 2200.0),
            epoch("compete_effnet_b0", "auto", 9000.0, 4000.0),          # 9000 - 1318 + 5801 = 13,483 MB: too much
            epoch("compete_effnet_b0", "auto", 12000.0, 4000.0, swa=True, swa_bn_peak_memory_mb=3000.0)]
    fits = {fit["config"]: fit for fit in summary(rows)["t4"]}
    assert fits["baseline_bn"]["peak_mb"] == pytest.approx(2500.0 - 1318.0 + 5801.0, abs=1)    # its fp16 row
    assert fits["baseline_bn"]["fits"] and not fits["compete_effnet_b0"]["fits"]
    assert fits["compete_effnet_b0"]["peak_mb"] == pytest.approx(9000.0 - 1318.0 + 5801.0, abs=1), "not the SWA row"
    table = format_report(summary(rows))
    assert "compete_effnet_b0: fits a 16 GB T4 at batch 128: NO (peak 13,483 MB" in table
    assert "baseline_bn: fits a 16 GB T4 at batch 128: yes" in table


def test_a_compiled_row_times_its_second_epoch_and_reports_the_first_ones_extra_as_compile_seconds(tmp_path):
    import pandas as pd

    from kit.gpu_check import check_config, epoch_numbers
    from kit.gpu_report import format_run

    assert check_config("effnet_b0", tmp_path, tmp_path, "cpu", compiled=True).epochs == 2
    assert check_config("effnet_b0", tmp_path, tmp_path, "cpu").epochs == 1
    history = pd.DataFrame({"images_per_s": [900.0, 4000.0], "seconds": [70.0, 12.0],
                            "peak_memory_mb": [5000.0, 5100.0]})
    numbers = epoch_numbers(history, compiled=True)
    assert numbers["train_images_per_s"] == 4000.0 and numbers["epoch_seconds"] == 12.0
    assert numbers["compile_seconds"] == 58.0 and numbers["peak_memory_mb"] == 5100.0
    row = {"config": "effnet_b0", "precision": "auto", "compiled": True, "status": "ok", "val_auc": 0.9, **numbers}
    assert "compile 58 s (first epoch 70.0 s)" in format_run(row)


def test_a_failed_correctness_check_is_its_row_and_fails_the_check(monkeypatch, tmp_path):
    import kit.gpu_correctness
    from kit.gpu_check import correctness
    from kit.gpu_report import format_check, summary

    def resumes_elsewhere(data_dir, out_dir, device):
        raise AssertionError("resumed val AUC 0.61 vs straight-through 0.93: 0.32 apart (more than rounding)")

    monkeypatch.setattr(kit.gpu_correctness, "CHECKS", {"trains and resumes under sync debug": resumes_elsewhere})
    row = correctness("trains and resumes under sync debug", tmp_path, tmp_path, "cpu")
    assert row["status"] == "FAILED" and "0.32 apart" in row["error"] and "0.32 apart" in format_check(row)
    epoch = {"kind": "epoch", "config": "baseline_bn", "precision": "auto", "compiled": False, "status": "ok"}
    assert summary([epoch, {"kind": "correctness", **row}])["passed"] is False
    assert summary([epoch])["passed"] is True


def test_a_check_that_does_not_hold_fails_under_python_dash_o_too(tmp_path):
    """`python -O` strips asserts: the checks raise CheckFailed themselves, so a card that resumes elsewhere or
    predicts otherwise than the CPU is a FAILED row however Python runs."""
    import ast

    import kit.gpu_correctness

    script = tmp_path / "failing_checks.py"
    script.write_text(
        "import sys\nimport numpy as np\nimport torch\n"
        "from kit.gpu_correctness import CheckFailed, same_weights, tta_gaps\n"
        "print('optimize', sys.flags.optimize)\n"
        "for check, found in ((same_weights, ({'w': torch.zeros(3)}, {'w': torch.tensor([0.0, 0.0, 1e-3])})),\n"
        "                     (tta_gaps, (np.zeros(4), np.full(4, 0.01), np.zeros(4)))):\n"
        "    try:\n"
        "        check(*found)\n"
        "        print('passed')\n"
        "    except CheckFailed as err:\n"
        "        print('FAILED:', err)\n")
    done = subprocess.run([sys.executable, "-O", str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "optimize 1",
        "FAILED: the resumed fold's `w` differs from the straight-through fold's by up to 0.001 (the same steps on "
        "deterministic kernels must give the same weights)",
        "FAILED: fp32 TTA probabilities differ from the CPU's by up to 1.00e-02"]
    tree = ast.parse(Path(kit.gpu_correctness.__file__).read_text())
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert not asserts, f"kit/gpu_correctness.py asserts on lines {asserts}: python -O would pass them"


def test_gpu_check_without_a_gpu_is_one_line_and_exit_2(capsys):
    from kit.cli import main

    assert main(["gpu-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "make gpu-check needs a GPU, and PyTorch sees none here" in err


@pytest.mark.slow
def test_gpu_check_runs_every_step_end_to_end(tmp_path):
    """The same script on the CPU, small: bench, an epoch under the sync-debug switch, TTA, scale-out on two
    processes (DDP over gloo, two folds at once), the JSON and the table (on a GPU the same code adds forced fp16,
    compile and peak memory)."""
    import json

    from kit.fold import train_fold
    from kit.gpu_check import check_config, run_gpu_check, timing_data
    from kit.gpu_report import read_rows

    # the epoch row's fold, trained here the same way (the CPU repeats it bit for bit): the row reports its AUC
    reference = train_fold(check_config("baseline_bn", timing_data(tmp_path / "reference", 200, test=24),
                                        tmp_path / "reference" / "runs", "cpu"), 0, log=lambda *_: None)
    lines = []
    path, passed = run_gpu_check(tmp_path / "check", images=200, test_images=24, configs=("baseline_bn",), compiled=(),
                                 device="cpu", bench_images=32, bench_seconds=0.0, scale_out_processes=2,
                                 log=lines.append)
    report = json.loads(path.read_text())
    rows = read_rows(path.with_suffix(".jsonl"))           # every row, as it finished
    assert [row["kind"] for row in rows] == ["header", "resident", "epoch", "epoch", "tta", "bench", "scale_out",
                                             "scale_out"]
    failed = [row for row in rows if row.get("status") not in (None, "ok", "skipped")]
    assert passed and report["passed"] and report["card"] == "cpu", failed
    assert report["resident"]["status"] == "skipped" and report["resident"]["images"] == 220_025
    run, swa = report["epochs"]
    assert run["status"] == "ok" and run["precision"] == "auto" and run["train_images_per_s"] > 0
    assert run["peak_memory_mb"] is None and run["batch_size"] == 32
    assert run["val_auc"] == reference["best_val_auc"]
    assert swa["status"] == "ok" and swa["swa"] and swa["swa_bn_seconds"] > 0, "SWA's BatchNorm pass is timed"
    assert report["correctness"] == [], "the correctness checks are a GPU's (make test proves the CPU path)"
    assert report["tta"]["status"] == "ok" and report["tta"]["views"] == "d4"
    assert "epoch (input + step + EMA) baseline" in report["bench"]["results"]
    assert [row["mode"] for row in report["scale_out"]] == ["DDP × 2", "2 folds at once"]
    assert all(row["status"] == "ok" and row["train_images_per_s"] > 0 for row in report["scale_out"])
    assert lines[-1].endswith("passed") and "train img/s" in lines[-1] and "× one process" in lines[-1]


def test_gpu_check_plans_rows_by_value_within_its_budget_and_a_cut_off_run_keeps_its_rows(tmp_path, capsys):
    import json
    import signal
    import time

    from kit.gpu_check import planned_epochs, run_gpu_check
    from kit.gpu_report import read_rows

    plan = planned_epochs(("baseline", "baseline_bn", "compete_effnet_b0", "effnet_b0"), ["auto", "fp16"],
                          ("baseline_bn", "effnet_b0"))
    assert plan == [("baseline_bn", "auto", False), ("baseline_bn", "fp16", False), ("compete_effnet_b0", "auto", False),
                    ("baseline", "auto", False), ("baseline", "fp16", False), ("effnet_b0", "auto", False),
                    ("effnet_b0", "fp16", False), ("baseline_bn", "auto", True), ("effnet_b0", "auto", True)]

    # a budget that the first row already spends: the first row runs, every later one is recorded as skipped
    path, passed = run_gpu_check(tmp_path / "budget", images=300, test_images=20, configs=("baseline_bn", "baseline"),
                                 compiled=(), device="cpu", bench_images=64, bench_seconds=0.0, minutes=0.001,
                                 log=lambda *_: None)
    report = json.loads(path.read_text())
    assert [row["status"] for row in report["epochs"]] == ["ok", "skipped", "skipped"] and passed
    assert report["epochs"][-1]["swa"]
    assert report["bench"] is None and report["tta"] is None

    # killed mid-way (as a time limit would): the rows it finished are on disk, and --rows prints their table
    out = tmp_path / "killed"
    check = subprocess.Popen([sys.executable, "-m", "kit", "gpu-check", "--device", "cpu", "--quick", "--images",
                              "300", "--configs", "baseline_bn baseline", "--out", str(out)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, TQDM_DISABLE="1"))
    deadline = time.monotonic() + 240
    while not any(row["kind"] == "epoch" for rows in map(read_rows, out.glob("*.jsonl")) for row in rows):
        assert time.monotonic() < deadline and check.poll() is None, check.stdout.read() if check.poll() else ""
        time.sleep(0.2)
    check.send_signal(signal.SIGKILL)
    check.wait()
    (rows_file,) = out.glob("*.jsonl")
    kinds = [row["kind"] for row in read_rows(rows_file)]
    assert kinds[:3] == ["header", "resident", "epoch"] and not list(out.glob("*.json"))
    from kit.cli import main

    assert main(["gpu-check", "--rows", str(rows_file)]) == 0
    table = capsys.readouterr().out
    assert "cut off before its end" in table and "baseline_bn" in table
