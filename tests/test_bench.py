"""`make bench` (kit/bench.py): its table and JSON."""

import json

import pytest

from kit.bench import bench

D4 = [{"name": name, "p": 0.5} for name in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose")]


def test_bench_prints_a_table_and_writes_json(tmp_path):
    lines = []
    path = bench(tmp_path / "bench", log=lines.append, images=64, batch_size=16, min_seconds=0.0)
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "settings", "results", "targets", "peak_memory_mb"}
    assert report["machine"]["cores"] >= 1 and report["peak_memory_mb"] == {}, "peak memory is a GPU number"
    for name in ("decode (1 core)", "input (a) d4", "input (b) default", "input (c) default", "train step baseline",
                 "train step resnet18", "epoch (input + step + EMA) baseline", "epoch (input + step + EMA) resnet18",
                 "TTA ×8 inference resnet18"):
        assert report["results"][name] > 0, name
    ratio = report["targets"]["(c) / (a), d4"]
    assert ratio["value"] == pytest.approx(report["results"]["input (c) d4"] / report["results"]["input (a) d4"])
    epoch = report["targets"]["epoch / train step resnet18"]
    assert epoch["needs"] == pytest.approx(1 / 1.3) and not epoch["applies"], "a GPU target"
    table = lines[-1]
    assert "(c) / (a), default" in table and "cache build / (decode × cores)" in table and "≥ 10" in table
