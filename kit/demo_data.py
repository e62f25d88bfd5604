"""Generated demo data in exactly the Kaggle layout, with the competition's labelling rule.

Patches look like H&E-stained lymph node: pink stroma, many small dark lymphocyte nuclei. Some carry a tumour-like
cluster of large, pale, irregular nuclei. The label follows the competition's rule, computed from the drawn
tumour mask: positive iff tumour touches the centre 32×32. A share of negatives carry a cluster that stays outside
the centre, so a model must look at where the tumour is, not only whether there is one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .competition import (CENTRE, CENTRE_SIZE, CENTRE_START, IMAGE_SIZE, IMAGE_SUFFIX, SAMPLE_SUBMISSION_CSV,
                          TEST_DIR, TRAIN_DIR, TRAIN_LABELS_CSV)
from .io import atomic_path, atomic_write_csv

POSITIVE_SHARE = 0.40            # the real train set is 40.5% positive
OFF_CENTRE_SHARE_OF_NEGATIVES = 0.35


def random_id(rng: np.random.Generator) -> str:
    """A 40-hex id like Kaggle's (a SHA-1 of random bytes)."""
    return hashlib.sha1(rng.bytes(16)).hexdigest()


def _draw_tissue(rng: np.random.Generator) -> np.ndarray:
    """Pink stroma with smooth stain variation and scattered small dark nuclei (RGB uint8)."""
    base = np.array([225, 160, 200], dtype=np.float32) + rng.normal(0, 10, 3)
    low_freq = cv2.resize(rng.normal(0, 14, (6, 6, 3)).astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE),
                          interpolation=cv2.INTER_CUBIC)
    image = np.clip(base + low_freq + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(25, 60)):
        centre = tuple(int(v) for v in rng.integers(0, IMAGE_SIZE, 2))
        colour = tuple(int(v) for v in np.array([70, 40, 120]) + rng.normal(0, 12, 3))
        cv2.circle(image, centre, int(rng.integers(1, 3)), colour, -1, lineType=cv2.LINE_AA)
    for _ in range(rng.integers(0, 3) if rng.random() < 0.4 else 0):
        # mimics: single large pale nuclei (histiocytes) anywhere; a lone cell is not a tumour cluster
        centre = tuple(int(v) for v in rng.integers(8, IMAGE_SIZE - 8, 2))
        colour = tuple(int(v) for v in np.array([165, 115, 195]) + rng.normal(0, 10, 3))
        cv2.ellipse(image, centre, (int(rng.integers(3, 6)), int(rng.integers(3, 5))), float(rng.uniform(0, 180)),
                    0, 360, colour, -1, lineType=cv2.LINE_AA)
    return image


def _draw_tumour(image: np.ndarray, rng: np.random.Generator, cluster_centre: np.ndarray) -> np.ndarray:
    """Draw a cluster of large, pale, irregular nuclei with dark rims; return the boolean tumour mask."""
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    radius = rng.uniform(8, 16)
    for _ in range(rng.integers(4, 10)):
        offset = rng.normal(0, radius / 2, 2)
        x, y = (int(v) for v in np.clip(cluster_centre + offset, 0, IMAGE_SIZE - 1))
        axes = (int(rng.integers(4, 8)), int(rng.integers(3, 6)))
        angle = float(rng.uniform(0, 180))
        fill = tuple(int(v) for v in np.array([120, 65, 160]) + rng.normal(0, 10, 3))   # hyperchromatic
        rim = tuple(int(v) for v in np.array([60, 25, 100]) + rng.normal(0, 8, 3))
        cv2.ellipse(image, (x, y), axes, angle, 0, 360, fill, -1, lineType=cv2.LINE_AA)
        cv2.ellipse(image, (x, y), axes, angle, 0, 360, rim, 1, lineType=cv2.LINE_AA)
        cv2.ellipse(mask, (x, y), axes, angle, 0, 360, 1, -1)
    return mask.astype(bool)


def _off_centre_point(rng: np.random.Generator, margin: int) -> np.ndarray:
    """A point at least `margin` px outside the centre square (in a random border band)."""
    low, high = CENTRE_START - margin, CENTRE_START + CENTRE_SIZE + margin
    while True:
        point = rng.uniform(4, IMAGE_SIZE - 4, 2)
        if not (low <= point[0] < high and low <= point[1] < high):
            return point


def make_patch(rng: np.random.Generator, want_positive: bool) -> tuple[np.ndarray, int]:
    """One patch and its label by the competition's rule (tumour pixels inside the centre 32×32)."""
    while True:
        image = _draw_tissue(rng)
        if want_positive:
            mask = _draw_tumour(image, rng, rng.uniform(CENTRE_START + 4, CENTRE_START + CENTRE_SIZE - 4, 2))
        elif rng.random() < OFF_CENTRE_SHARE_OF_NEGATIVES:
            mask = _draw_tumour(image, rng, _off_centre_point(rng, margin=14))
        else:
            return image, 0
        label = int(mask[CENTRE, CENTRE].any())
        if label == int(want_positive):      # redraw the rare cluster that strayed across the boundary
            return image, label


def write_patch(path: Path, image_rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        ok, encoded = cv2.imencode(IMAGE_SUFFIX, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(encoded.tobytes())


def make_demo_data(out_dir: str | Path, n_train: int = 1500, n_test: int = 400, seed: int = 0) -> Path:
    """Write train/, test/, train_labels.csv and sample_submission.csv (test ids unsorted, label 0)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split in (TRAIN_DIR, TEST_DIR):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in ((TRAIN_DIR, n_train), (TEST_DIR, n_test)):
        for _ in range(count):
            image_id = random_id(rng)
            image, label = make_patch(rng, want_positive=rng.random() < POSITIVE_SHARE)
            write_patch(out_dir / split / f"{image_id}{IMAGE_SUFFIX}", image)
            rows.append((split, image_id, label))
    table = pd.DataFrame(rows, columns=["split", "id", "label"])
    test_ids = table.loc[table["split"] == TEST_DIR, "id"].tolist()
    if test_ids == sorted(test_ids) and len(test_ids) > 1:   # Kaggle's sample is not sorted; keep that property
        test_ids[0], test_ids[-1] = test_ids[-1], test_ids[0]
    atomic_write_csv(out_dir / TRAIN_LABELS_CSV, table.loc[table["split"] == TRAIN_DIR, ["id", "label"]])
    atomic_write_csv(out_dir / SAMPLE_SUBMISSION_CSV, pd.DataFrame({"id": test_ids, "label": 0}))
    return out_dir


def demo_data_is_complete(out_dir: str | Path, n_train: int, n_test: int) -> bool:
    """True when both CSVs exist with the expected row counts and every listed image is present."""
    out_dir = Path(out_dir)
    try:
        train = pd.read_csv(out_dir / TRAIN_LABELS_CSV, dtype={"id": str})
        test = pd.read_csv(out_dir / SAMPLE_SUBMISSION_CSV, dtype={"id": str})
    except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return False
    return (len(train) == n_train and len(test) == n_test
            and all((out_dir / TRAIN_DIR / f"{i}{IMAGE_SUFFIX}").is_file() for i in train["id"])
            and all((out_dir / TEST_DIR / f"{i}{IMAGE_SUFFIX}").is_file() for i in test["id"]))
