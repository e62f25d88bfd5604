"""docs/RESULTS.md is the study's record: `make results` merges what it measured into it, one row per config and
protocol (the one over the most seeds), each row traceable to the commit and config that made it, and it never drops
a row it did not measure again (a fresh clone has no runs/results/results.jsonl, only the committed page). The page
and the raw rows are the user's files, under the current folder: an installed kit never writes into itself."""

import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from kit.cli import main
from kit.results import code_commit, entry_config, read_results_md, run_entry, write_results_md
from kit.runs import config_fingerprint

from conftest import REPO

STUDY = "1 of 5 folds, 4 epochs"


def row(entry: str, seed: int, epochs: int = 4, machine: str = "GPU X; x86_64; torch 2.11", cv_auc: float | None = None,
        commit: str = "abc1234", fingerprint: str = "0123456789abcdef") -> dict:
    return {"entry": entry, "seed": seed, "folds": 1, "n_splits": 5, "epochs": epochs, "overrides": {"epochs": epochs},
            "cv_auc": 0.9 + seed / 100 if cv_auc is None else cv_auc, "test_auc": 0.95, "minutes_per_fold": 0.2,
            "stalled_folds": 0, "model": entry, "tta": "d4", "when": "2026-12-01T20:00:00", "machine": machine,
            "commit": commit, "config_fingerprint": fingerprint}


def table_lines(page, entry: str, protocol: str = STUDY) -> list[str]:
    return [line for line in page.read_text().splitlines() if line.startswith(f"| `{entry}` | {protocol} |")]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_results_are_merged_into_the_committed_page_never_replacing_it(tmp_path):
    page = tmp_path / "RESULTS.md"
    shutil.copyfile(REPO / "docs" / "RESULTS.md", page)
    before, findings_before, machines_before, when_before = read_results_md(page)
    assert len(before) >= 9 and findings_before and machines_before

    write_results_md([row("effnet_b0", 0, epochs=2)], page)          # a new protocol: one row more
    after, findings_after, machines, when = read_results_md(page)
    assert {key: line for key, line in after.items() if key in before} == before, "every old row kept as it was"
    assert set(after) - set(before) == {("effnet_b0", "1 of 5 folds, 2 epochs")}
    assert findings_after == findings_before and machines == machines_before | {"GPU X; x86_64; torch 2.11"}
    assert when == max(when_before, "2026-12-01T20:00:00")      # the newest row's time

    key = ("baseline_bn", STUDY)                                 # the same seeds measured again: replaced in place
    write_results_md([row("baseline_bn", seed) for seed in range(5)], page)
    again, _, _, _ = read_results_md(page)
    assert list(again) == list(after), "same rows, same order"
    assert again[key] != before[key] and "0.9200 ± 0.0158" in again[key]       # sample std of .90 … .94
    assert all(again[k] == after[k] for k in after if k != key)


def test_a_study_resumed_seed_by_seed_leaves_only_its_row_over_the_most_seeds(tmp_path):
    page = tmp_path / "RESULTS.md"
    rows = [row("baseline_bn", seed) for seed in range(3)]
    for done in range(1, 4):                                     # run_study rewrites the page after every seed
        write_results_md(rows[:done], page)
    assert [cells(line)[2] for line in table_lines(page, "baseline_bn")] == ["3"]

    write_results_md([row("baseline_bn", 0, cv_auc=0.5)], page)      # fewer seeds (another clone's rows): kept out
    assert [cells(line)[2] for line in table_lines(page, "baseline_bn")] == ["3"]
    assert "0.5000" not in page.read_text()


def test_a_page_with_two_rows_of_one_config_and_protocol_is_rewritten_with_the_one_over_more_seeds(tmp_path):
    old_table = """\
        | config | protocol | seeds | CV AUC (OOF, TTA) | test AUC | min / fold | stalled folds |
        | --- | --- | ---: | ---: | ---: | ---: | ---: |
        | `baseline_bn` | 1 of 5 folds, 4 epochs | 5 | 0.9425 ± 0.0017 | 0.9854 ± 0.0018 | 0.7 | 0 of 5 |
        | `lite0_random` | 1 of 5 folds, 4 epochs | 3 | 0.5267 ± 0.0057 | 0.5467 ± 0.0137 | 1.2 | 3 of 3 |
        | `baseline_bn` | 1 of 5 folds, 4 epochs | 3 | 0.9461 ± 0.0006 | 0.9828 ± 0.0022 | 17.5 | 0 of 3 |

        Machine: CPU, 2 threads; x86_64; torch 2.14.1+cu130. Last row written 2026-12-02T17:01:47.
        """
    page = tmp_path / "RESULTS.md"
    page.write_text(textwrap.dedent(old_table))
    assert main(["results", "--rewrite", "--page", str(page), "--out", str(tmp_path / "none")]) == 0
    kept = table_lines(page, "baseline_bn")
    assert len(kept) == 1 and cells(kept[0])[2:5] == ["5", "0.9425 ± 0.0017", "0.9854 ± 0.0018"]
    assert cells(table_lines(page, "lite0_random")[0])[3] == "0.5267 ± 0.0057", "numbers kept as measured"
    assert cells(kept[0])[7:] == ["not recorded†", "not recorded†"] and "† Written before rows recorded" in \
        page.read_text(), "the older rows say that they carry no commit and that their ± is the population std"
    assert "Last row written 2026-12-02T17:01:47." in page.read_text()


def test_the_committed_page_is_what_the_code_writes_from_its_rows_one_row_per_config_and_protocol(tmp_path,
                                                                                                 monkeypatch):
    committed = (REPO / "docs" / "RESULTS.md").read_text()
    lines = [cells(line) for line in committed.splitlines() if line.startswith("| `")]
    assert lines and all(len(line) == 9 for line in lines), "every row shows its commit and config fingerprint"
    keys = [(line[0], line[1]) for line in lines]
    assert len(keys) == len(set(keys)), "one row per config and protocol"
    monkeypatch.chdir(tmp_path)                          # as in a clone: the page, no runs/results/results.jsonl
    page = tmp_path / "docs" / "RESULTS.md"
    page.parent.mkdir()
    page.write_text(committed)
    assert main(["results", "--rewrite"]) == 0
    assert page.read_text() == committed, "regenerated by `hcd-kit results --rewrite`, not edited by hand"


def test_the_spread_is_the_sample_std_and_one_seed_has_none(tmp_path):
    page = tmp_path / "RESULTS.md"
    write_results_md([row("baseline_bn", seed, cv_auc=auc) for seed, auc in enumerate([0.90, 0.92, 0.94])], page)
    assert cells(table_lines(page, "baseline_bn")[0])[3] == "0.9200 ± 0.0200"     # population std: 0.0163
    assert np.std([0.90, 0.92, 0.94], ddof=1) == pytest.approx(0.02)
    write_results_md([row("effnet_b0", 0, epochs=2, cv_auc=0.8)], page)
    assert cells(table_lines(page, "effnet_b0", "1 of 5 folds, 2 epochs")[0])[3:5] == ["0.8000 ± n/a", "0.9500 ± n/a"]
    assert "± 0.0000" not in table_lines(page, "effnet_b0", "1 of 5 folds, 2 epochs")[0]


def test_every_row_records_the_kits_commit_and_the_fingerprint_its_seeds_share(tmp_path, monkeypatch):
    import kit.fold
    import kit.predict

    monkeypatch.setattr(kit.fold, "train_fold", lambda cfg, fold, log=print: {"stalled": False})
    monkeypatch.setattr(kit.predict, "predict_test", lambda cfg, allow_missing_folds=False, log=print: SimpleNamespace(
        ids=["a"], probabilities=np.array([0.5]), cv_auc=0.9))
    data, out = str(tmp_path / "hard"), str(tmp_path / "runs")
    rows = [run_entry("baseline_bn", seed, 1, {"epochs": 1}, data, out, log=lambda *_: None) for seed in (0, 1)]
    other = run_entry("baseline_bn", 0, 1, {"epochs": 2}, data, out, log=lambda *_: None)

    assert [r["commit"] for r in rows] == [code_commit()] * 2
    seed0 = config_fingerprint(entry_config("baseline_bn", 0, 1, {"epochs": 1}, data, out))
    assert [r["config_fingerprint"] for r in rows] == [seed0, seed0], "seed 0's, as its run.json records"
    assert other["config_fingerprint"] != seed0, "another config, another fingerprint"
    page = tmp_path / "RESULTS.md"
    write_results_md(rows, page)
    line = cells(table_lines(page, "baseline_bn", "1 of 5 folds, 1 epochs")[0])
    assert line[7:] == [f"`{code_commit()}`", f"`{seed0}`"]
    assert "| commit | config fingerprint |" in page.read_text()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_the_checkouts_head_marked_dirty_and_unknown_outside_a_checkout(tmp_path, monkeypatch):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path / "checkout"), "-c", "user.name=t", "-c", "user.email=t@t",
                               *args], capture_output=True, text=True, check=True).stdout.strip()
    package = tmp_path / "checkout" / "kit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (tmp_path / "checkout" / ".gitignore").write_text(".venv/\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "kit")
    assert code_commit(package) == git("rev-parse", "--short", "HEAD")
    (package / "__init__.py").write_text("# edited\n")
    assert code_commit(package) == git("rev-parse", "--short", "HEAD") + "-dirty"

    installed = tmp_path / "checkout" / ".venv" / "site-packages" / "kit"      # a venv inside someone's checkout
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert code_commit(installed) == "unknown"
    assert code_commit(tmp_path) == "unknown"                                    # no checkout at all
    monkeypatch.setenv("PATH", "")
    assert code_commit(package) == "unknown", "git missing: recorded as unknown, never an error"


def test_an_installed_kit_writes_the_page_and_rows_under_the_current_folder_never_into_itself(tmp_path):
    site = tmp_path / "site-packages"
    shutil.copytree(REPO / "kit", site / "kit", ignore=shutil.ignore_patterns("__pycache__"))
    installed = sorted(p.relative_to(site) for p in site.rglob("*") if "__pycache__" not in p.parts)
    work = tmp_path / "work"
    (work / "data" / "hard").mkdir(parents=True)
    (work / "data" / "hard" / "test_labels.csv").write_text("id,label\n")       # the hard set "made": none generated
    script = """
        import sys
        import kit.results
        def measured(entry, seed, folds, overrides, data_dir, out_dir, log=print):     # training stands in here
            return {"entry": entry, "seed": seed, "folds": folds, "n_splits": 5, "epochs": 4, "overrides": overrides,
                    "cv_auc": 0.9, "test_auc": 0.95, "minutes_per_fold": 0.1, "stalled_folds": 0, "when": "2026",
                    "machine": "CPU", "commit": kit.results.code_commit(), "config_fingerprint": "f" * 16}
        kit.results.run_entry = measured
        from kit.cli import main
        study = ["results", "--configs", "baseline_bn", "--seeds", "1", "--folds", "1", "epochs=4"]
        sys.exit(main(study) or main(study + ["--page", "mine.md", "--out", "elsewhere"]))
        """
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.relative_to(site) for p in site.rglob("*") if "__pycache__" not in p.parts) == installed, \
        "nothing written into the installed package or beside it"
    for page, rows in ((work / "docs" / "RESULTS.md", work / "runs" / "results"), (work / "mine.md",
                                                                                    work / "elsewhere")):
        assert (rows / "results.jsonl").is_file()
        assert cells(table_lines(page, "baseline_bn")[0])[7] == "`unknown`", "not a git checkout: unknown"
    assert [line for line in done.stdout.splitlines() if line.endswith(".md")] == ["docs/RESULTS.md", "mine.md"]


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "error: results --seeds 0: pass 1 or more"),
    (["--configs", ""], "error: results --configs: no config named; pass one or more"),
    (["--configs", " , "], "error: results --configs: no config named; pass one or more"),
    (["--folds", "-1"], "error: results --folds -1: pass 1 or more"),
    (["--rewrite"], "error: results: no rows to write: runs/results/results.jsonl has none"),
])
def test_bad_arguments_are_refused_in_one_line_before_anything_is_made(flags, message, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["results", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir()), "no data set generated, no page written"
