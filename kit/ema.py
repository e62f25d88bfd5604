"""The weights' exponential moving average: timm's ModelEmaV3, warmed up by the optimizer step.

Its own module so that timm (and the torchvision it imports, about 4 s on 2 cores) loads only in a run that averages
weights or builds a timm model: `make train` of the baseline CNN and each fold-parallel worker start without it.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn


class StepEma(ModelEmaV3):
    """timm's ModelEmaV3, warmed up by the optimizer step (decay 1 - (1 + step)^-2/3, capped at `decay`), so the
    average forgets the initial weights (random head included) within the first few hundred steps; and with its
    tensor lists gathered once, not walked out of `state_dict()` at every step. The lists alias the live tensors:
    optimizer steps and `load_state_dict` update them in place."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, decay=decay, use_warmup=True)
        self._pairs = None

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        if self._pairs is None or self._pairs[0] is not model:
            frozen = getattr(model, "frozen_parameter_names", set())     # model.trainable_blocks: equal for good
            pairs = [(ema, live) for (name, ema), live in zip(self.module.state_dict().items(),
                                                               model.state_dict().values()) if name not in frozen]
            floating = [(ema, live) for ema, live in pairs if ema.is_floating_point()]
            self._pairs = (model, [ema for ema, _ in floating], [live for _, live in floating],
                           [(ema, live) for ema, live in pairs if not ema.is_floating_point()])
        _, ema_values, live_values, counters = self._pairs
        torch._foreach_lerp_(ema_values, live_values, weight=1.0 - decay)    # same dtypes: the EMA is a copy
        if counters:                     # BatchNorm's num_batches_tracked: copied, one kernel for all
            torch._foreach_copy_([ema for ema, _ in counters], [live for _, live in counters])
