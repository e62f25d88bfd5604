"""Histopathologic Cancer Detection kit: config → data → folds → model → engine → predict → submission."""

import os

# albumentations asks PyPI for a newer version at import; training must never touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
