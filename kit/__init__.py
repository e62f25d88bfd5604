"""Histopathologic Cancer Detection kit: config → data → folds → model → engine → predict → submission."""

import os
import warnings

# albumentations asks PyPI for a newer version at import; training must never touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# older timm releases (1.0.19 among them) use torch.jit.interface, which newer torch deprecates with a warning at every
# import: noise where the kit promises one line per error (requirements-kaggle.txt admits those timm versions).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
