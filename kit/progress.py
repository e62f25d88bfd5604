"""Progress bars, one way for the whole kit: tqdm with the kit's settings. `TQDM_DISABLE=1` in the environment hides
them all (fold-parallel workers get it: their logs keep the epoch lines, not a bar redrawn per batch)."""

from __future__ import annotations

import os

from tqdm import tqdm


def progress_bar(iterable=None, hidden: bool = False, **options) -> tqdm:
    """tqdm over `iterable` (or with `total=`), redrawn at most twice a second; `hidden` or TQDM_DISABLE: no bar."""
    hidden = hidden or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, disable=hidden, **{"dynamic_ncols": True, "mininterval": 0.5, **options})
