"""albumentations pipelines built from the config's list of `{name: Transform, param: value}` entries.

The label lives in the centre 32×32, so a geometric transform must not move that region away from the centre:
every pipeline is probed with a centre mask when it is built, and one that drifts is refused.
"""

from __future__ import annotations

import copy
import warnings

import albumentations as A
import numpy as np

from .competition import CENTRE, CENTRE_SIZE, IMAGE_SIZE
from .errors import KitError

CENTRE_PROBES = 64              # random draws of the pipeline when checking it
MIN_CENTRE_OVERLAP = 2 / 3      # share of the output's centre 32×32 that must come from the input's centre


def build_transform(specs: list[dict], key: str, seed: int | None = None) -> A.Compose | None:
    """Compose the listed transforms (None when the list is empty: batches then skip per-image work)."""
    if not specs:
        return None
    transforms = []
    for position, spec in enumerate(specs):
        where = f"`{key}[{position}]`"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise KitError(f"config {where} must be a mapping with a `name`, e.g. {{name: HorizontalFlip, p: 0.5}}")
        params = {k: v for k, v in spec.items() if k != "name"}
        transform_class = getattr(A, spec["name"], None)
        if not isinstance(transform_class, type) or not issubclass(transform_class, A.BasicTransform):
            raise KitError(f"config {where}: `{spec['name']}` is not an albumentations transform "
                           f"(see https://albumentations.ai/docs/)")
        try:
            with warnings.catch_warnings():
                # albumentations only warns about an unknown parameter; here it is an error that names it
                warnings.filterwarnings("error", message=r"Argument\(s\) .* are not valid")
                transforms.append(transform_class(**params))
        except (TypeError, ValueError, UserWarning) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KitError(f"config {where} ({spec['name']}): bad parameters {spec}: {message}") from None
    transform = A.Compose(transforms, seed=seed)
    overlap = worst_centre_overlap(transform)
    if overlap < MIN_CENTRE_OVERLAP:
        raise KitError(f"config `{key}` moves the centre {CENTRE_SIZE}×{CENTRE_SIZE} (where the label lives): in the "
                       f"worst of {CENTRE_PROBES} draws only {overlap:.0%} of the output's centre comes from the "
                       f"input's centre; use milder shifts, scales or crops")
    return transform


def worst_centre_overlap(transform: A.Compose, probes: int = CENTRE_PROBES) -> float:
    """Over `probes` draws, the smallest share of the output's centre square that comes from the input's centre.

    The centre is tracked as a mask, so geometric transforms move it and colour transforms leave it alone.
    Runs on a copy with a fixed seed: the check is deterministic and the real pipeline's random state is untouched.
    """
    probe = copy.deepcopy(transform)
    probe.set_random_seed(0)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    centre_mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    centre_mask[CENTRE, CENTRE] = 1
    worst = 1.0
    for _ in range(probes):
        moved = probe(image=image, mask=centre_mask)["mask"]
        worst = min(worst, float(moved[CENTRE, CENTRE].mean()))
    return worst
