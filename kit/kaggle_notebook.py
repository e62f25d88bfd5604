"""Inside a Kaggle notebook: where the competition data, scratch space and the saved output are, and what the kit
does differently there.

- `/kaggle/input/...` is read-only; the competition is usually at /kaggle/input/histopathologic-cancer-detection,
  but a user may attach it (or a copy) under another name and pass it as `data_dir`;
- `/kaggle/working` is the notebook's saved output (20 GB at most): only results belong there;
- `/kaggle/temp` (else /tmp) is scratch space for the session: the image cache (7.7 GB for the competition) and the
  runs with their resume state go there whatever `data_dir` says, unless the config sets `out_dir`/`cache_dir`.

`kaggle_environment(cfg)` is the one step that applies this to a config, and says so in one line; `api.load_config`
takes it after `config.load_config` (outside a notebook the two give the same config).

Advice for a notebook names what a notebook user can do (attach an input), not terminal commands.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from pathlib import Path

from .competition import COMPETITION, SAMPLE_SUBMISSION_CSV
from .config import Config, apply_overrides
from .errors import KitError
from .progress import say

KAGGLE_ROOT_VARIABLE = "KIT_KAGGLE_ROOT"     # where a Kaggle notebook's /kaggle tree is (tests point it elsewhere)
KAGGLE_RUN_TYPE_VARIABLE = "KAGGLE_KERNEL_RUN_TYPE"     # set by Kaggle in every notebook session


def kaggle_root() -> Path:
    return Path(os.environ.get(KAGGLE_ROOT_VARIABLE, "/kaggle"))


def in_kaggle_notebook() -> bool:
    """A Kaggle notebook session: Kaggle's own variable, or a /kaggle tree with input/ and working/."""
    root = kaggle_root()
    return bool(os.environ.get(KAGGLE_RUN_TYPE_VARIABLE)) or ((root / "input").is_dir() and
                                                              (root / "working").is_dir())


def competition_input() -> Path | None:
    """The competition data attached to a Kaggle notebook under its own name, when it is."""
    path = kaggle_root() / "input" / COMPETITION
    return path if (path / SAMPLE_SUBMISSION_CSV).is_file() else None


def scratch_space() -> Path:
    """A Kaggle notebook's scratch space: /kaggle/temp (kept for the session, never saved as output), else /tmp."""
    for candidate in (kaggle_root() / "temp", Path(tempfile.gettempdir()) / "hcd-kit"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    raise KitError(f"no writable scratch space in {kaggle_root() / 'temp'} or {tempfile.gettempdir()}: pass "
                   f"out_dir=… and cache_dir=… to the config")


def kaggle_environment(cfg: Config, explicit: Collection[str] = (), log=say) -> Config:
    """`cfg` as a Kaggle notebook runs it: the attached competition as data folder when the config's does not
    exist, and the runs and the image cache in scratch space wherever the data is, unless set (`explicit`: keys the
    caller set by override, kept whatever their value; a config file whose `out_dir`/`cache_dir` differ from the
    defaults, e.g. the one fold-parallel workers get, keeps them too). One line says what changed; outside a
    notebook `cfg` comes back as it is and nothing is said."""
    if not in_kaggle_notebook():
        return cfg
    defaults = Config()
    changes = {}
    competition = competition_input()
    if competition is not None and "data_dir" not in explicit and not Path(cfg.data_dir).exists():
        changes["data_dir"] = str(competition)
    unset = [(key, folder) for key, folder in (("out_dir", "runs"), ("cache_dir", "cache"))
             if key not in explicit and getattr(cfg, key) == getattr(defaults, key)]
    if unset:
        scratch = scratch_space()
        changes.update({key: str(scratch / folder) for key, folder in unset})
    if not changes:
        log("Kaggle notebook environment: nothing changed (data_dir, out_dir and cache_dir as the config sets them)")
        return cfg
    said = [f"data_dir → {changes['data_dir']} (the attached competition)"] if "data_dir" in changes else []
    scratch_keys = [f"{key} → {changes[key]}" for key in ("out_dir", "cache_dir") if key in changes]
    if scratch_keys:
        said.append(", ".join(scratch_keys) + " (scratch space: the notebook's output keeps only results)")
    log(f"Kaggle notebook environment: {'; '.join(said)}")
    return apply_overrides(cfg, changes)


def get_data_hint() -> str:
    """What to do when the data folder is missing or incomplete."""
    if in_kaggle_notebook():
        return (f"attach the competition to this notebook (Add Input → Competitions → Histopathologic Cancer "
                f"Detection: /kaggle/input/{COMPETITION}), or set data_dir to the attached folder that holds "
                f"train/, test/ and the CSVs")
    return "run `make data` (or `make demo-data` for generated data), or pass DATA_DIR=/path/to/data"


def repair_hint(data_dir: Path) -> str:
    """What to do about images that cannot be used."""
    if in_kaggle_notebook():
        return (f"{data_dir} is a read-only input: attach the original competition data "
                f"(/kaggle/input/{COMPETITION}) or a complete copy, and set data_dir to it")
    return (f"run `make data DATA_DIR={data_dir}` to verify every image and re-extract the bad ones from the "
            f"competition zip (generated data: `make demo-data FORCE=1`), or replace them by hand")
