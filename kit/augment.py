"""albumentations pipelines built from the config's list of `{name: Transform, param: value}` entries."""

from __future__ import annotations

import inspect

import albumentations as A

from .errors import KitError


def build_transform(specs: list[dict], key: str, seed: int | None = None) -> A.Compose | None:
    """Compose the listed transforms (None when the list is empty: the fast path skips per-image work)."""
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
            if "strict" in inspect.signature(transform_class).parameters:
                params["strict"] = True     # unknown parameters raise instead of a warning
            transforms.append(transform_class(**params))
        except (TypeError, ValueError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KitError(f"config {where} ({spec['name']}): bad parameters {spec}: {message}") from None
    return A.Compose(transforms, seed=seed)
