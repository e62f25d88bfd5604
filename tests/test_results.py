"""docs/RESULTS.md is the study's record: `make results` merges what it measured into it and never drops a row it did
not measure again (a fresh clone has no runs/results/results.jsonl, only the committed page)."""

import shutil

from kit.results import read_results_md, write_results_md

from conftest import REPO


def row(entry: str, seed: int, epochs: int = 4, machine: str = "GPU X; x86_64; torch 2.11") -> dict:
    return {"entry": entry, "seed": seed, "folds": 1, "n_splits": 5, "epochs": epochs, "overrides": {"epochs": epochs},
            "cv_auc": 0.9 + seed / 100, "test_auc": 0.95, "minutes_per_fold": 0.2, "stalled_folds": 0,
            "model": entry, "tta": "d4", "when": "2026-12-01T20:00:00", "machine": machine}


def test_results_are_merged_into_the_committed_page_never_replacing_it(tmp_path):
    page = tmp_path / "RESULTS.md"
    shutil.copyfile(REPO / "docs" / "RESULTS.md", page)
    before, findings_before, machines_before, when_before = read_results_md(page)
    assert len(before) >= 9 and findings_before and machines_before

    write_results_md([row("effnet_b0", 0, epochs=2)], page)          # a new protocol: one row more
    after, findings_after, machines, when = read_results_md(page)
    assert {key: line for key, line in after.items() if key in before} == before, "every old row kept as it was"
    assert set(after) - set(before) == {("effnet_b0", "1 of 5 folds, 2 epochs", "1")}
    assert findings_after == findings_before and machines == machines_before | {"GPU X; x86_64; torch 2.11"}
    assert when == max(when_before, "2026-12-01T20:00:00")      # the newest row's time

    key = ("baseline_bn", "1 of 5 folds, 4 epochs", "5")            # the same key measured again: replaced in place
    write_results_md([row("baseline_bn", seed) for seed in range(5)], page)
    again, _, _, _ = read_results_md(page)
    assert list(again) == list(after), "same rows, same order"
    assert again[key] != before[key] and "0.9200 ± 0.0141" in again[key]
    assert all(again[k] == after[k] for k in after if k != key)
