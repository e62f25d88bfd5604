"""`make bench` (kit/bench.py): its rates, targets, table and JSON."""

import json
import re

import pytest
import torch

from kit.bench import bench, format_table, images_per_second, summarise


def test_a_rate_leaves_out_the_warm_up_and_runs_until_the_minimum_time():
    now, calls = [0.0], []

    def run() -> int:                # 10 images a call: the first (warm-up) takes 5 s, each later one 0.5 s
        now[0] += 5.0 if not calls else 0.5
        calls.append(now[0])
        return 10

    rate = images_per_second(run, torch.device("cpu"), min_seconds=2.0, clock=lambda: now[0])
    assert rate == 20.0 and len(calls) == 5, "4 timed calls: 40 images in 2 s (with the warm-up: 50 in 7 s)"


RESULTS = {"decode (1 core)": 1000.0, "cache build (4 cores)": 2800.0,
           "input (a) d4": 100.0, "input (b) d4": 400.0, "input (c) d4": 1000.0,
           "input (a) default": 100.0, "input (b) default": 300.0, "input (c) default": 900.0,
           "train step baseline": 300.0, "train step resnet18": 200.0,
           "epoch (input + step + EMA) baseline": 240.0, "epoch (input + step + EMA) resnet18": 100.0,
           "TTA ×8 inference baseline": 2000.0, "TTA ×8 inference resnet18": 800.0}


@pytest.mark.parametrize("gpu", [None, "NVIDIA L4"])
def test_each_target_is_its_ratio_against_its_bound_and_the_step_targets_are_a_gpus(gpu):
    report = summarise(RESULTS, {"cpu": "x86", "cores": 4, "gpu": gpu, "torch": "2"}, {"timm_model": "resnet18"})
    on_gpu = gpu is not None
    assert {name: (t["value"], t["needs"], t["met"], t["applies"]) for name, t in report["targets"].items()} == {
        "(c) / (a), d4": (10.0, 10.0, True, True),                        # 1000 / 100: exactly the bound
        "(c) / (a), default": (9.0, 10.0, False, True),
        "cache build / (decode × cores)": (0.7, 0.7, True, True),         # 2800 / (1000 × 4)
        "(c) default / train step baseline": (3.0, 3.0, True, on_gpu),    # 900 / 300
        "epoch / train step baseline": (0.8, 1 / 1.3, True, on_gpu),      # 240 / 300
        "(c) default / train step resnet18": (4.5, 3.0, True, on_gpu),
        "epoch / train step resnet18": (0.5, 1 / 1.3, False, on_gpu)}
    verdicts = dict(re.findall(r"^(\S.*?) +\d+\.\d\d +≥ [\d.]+  (.+)$", format_table(report), re.M))
    gpu_verdict = {True: "met", False: "MISSED"} if on_gpu else {True: "n/a (GPU target)", False: "n/a (GPU target)"}
    assert verdicts == {"(c) / (a), d4": "met", "(c) / (a), default": "MISSED",
                        "cache build / (decode × cores)": "met",
                        "(c) default / train step baseline": gpu_verdict[True],
                        "epoch / train step baseline": gpu_verdict[True],
                        "(c) default / train step resnet18": gpu_verdict[True],
                        "epoch / train step resnet18": gpu_verdict[False]}


def test_bench_measures_every_stage_on_this_machine_and_prints_what_it_writes(tmp_path):
    lines = []
    path = bench(tmp_path / "bench", log=lines.append, images=64, batch_size=16, min_seconds=0.0)
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "settings", "results", "targets", "peak_memory_mb"}
    assert report["machine"]["cores"] >= 1 and report["peak_memory_mb"] == {}, "peak memory is a GPU number"
    assert report["settings"]["images"] == 64 and report["settings"]["batch_size"] == 16
    cores = report["machine"]["cores"]
    expected = ["decode (1 core)", f"cache build ({cores} cores)"] + [
        f"input ({letter}) {pipeline}" for pipeline in ("d4", "default") for letter in "abc"] + [
        f"{stage} {model}" for model in ("baseline", "resnet18")
        for stage in ("train step", "epoch (input + step + EMA)", "TTA ×8 inference")]
    assert list(report["results"]) == expected and all(rate > 0 for rate in report["results"].values())
    assert report["targets"] == summarise(report["results"], report["machine"], report["settings"])["targets"]
    # the printed table is the JSON: every rate as written, and each target's verdict (the step ones a GPU's)
    table = lines[-1]
    for name, rate in report["results"].items():
        assert f"{name:<46}{rate:>12,.0f}" in table, name
    for name, target in report["targets"].items():
        verdict = ("met" if target["met"] else "MISSED") if target["applies"] else "n/a (GPU target)"
        assert re.search(rf"^{re.escape(name)} +{target['value']:.2f} +≥ \S+  {re.escape(verdict)}$", table, re.M)
    assert not any(target["applies"] for name, target in report["targets"].items() if "train step" in name)
