"""Generated data in exactly the Kaggle layout, with the competition's labelling rule, at two difficulties.

Patches look like H&E-stained lymph node: pink stroma, many small dark lymphocyte nuclei. Some carry a tumour-like
cluster of large, pale, irregular nuclei. The label follows the competition's rule, computed from the drawn
tumour mask: positive iff tumour touches the centre 32×32. A share of negatives carry a cluster that stays outside
the centre, so a model must look at where the tumour is, not only whether there is one.

`easy` (the demo): every recipe scores ≈ 1.0; it proves the pipeline runs, not that a model learns well.
`hard`: patches come from slides, each with its own stain, blur and noise; tumour nuclei are smaller, fewer and
closer in colour to normal ones; many negatives carry a cluster just outside the centre 32×32, and lone tumour-like
mimics appear anywhere; a few training labels are wrong. `slides.csv` (id, slide) allows slide-grouped folds, and
`test_labels.csv` holds the test answers (not part of Kaggle's layout) so that a test AUC can be measured.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .competition import (
    CENTRE,
    CENTRE_SIZE,
    CENTRE_START,
    IMAGE_SIZE,
    IMAGE_SUFFIX,
    SAMPLE_SUBMISSION_CSV,
    TEST_DIR,
    TRAIN_DIR,
    TRAIN_LABELS_CSV,
)
from .io import atomic_path, atomic_write_csv
from .progress import progress_bar

POSITIVE_SHARE = 0.40            # the real train set is 40.5% positive
DIFFICULTIES = ("easy", "hard")
SLIDES_CSV = "slides.csv"        # hard: id → slide, for folds.groups_csv
TEST_LABELS_CSV = "test_labels.csv"   # hard: the test set's true labels, to measure a test AUC


@dataclass(frozen=True)
class Difficulty:
    off_centre_share: float      # negatives with a tumour cluster outside the centre 32×32
    off_centre_margin: tuple     # how far outside the centre square that cluster's centre lies, px
    nuclei: tuple                # tumour nuclei per cluster (low, high)
    axes: tuple                  # tumour nucleus half-axes (low, high), px
    fill: tuple                  # tumour nucleus colour, RGB
    fill_jitter: float
    rim_share: float             # share of tumour nuclei drawn with a dark rim
    mimic_share: float           # patches with lone tumour-like nuclei (not a cluster: not tumour)
    slides: int                  # 0 = no slides: one stain for all
    label_noise: float           # share of training labels flipped


LEVELS = {
    "easy": Difficulty(off_centre_share=0.35, off_centre_margin=(14, 14), nuclei=(4, 10), axes=(4, 8),
                       fill=(120, 65, 160), fill_jitter=10, rim_share=1.0, mimic_share=0.4, slides=0,
                       label_noise=0.0),
    "hard": Difficulty(off_centre_share=0.5, off_centre_margin=(4, 10), nuclei=(2, 6), axes=(3, 6),
                       fill=(135, 85, 170), fill_jitter=16, rim_share=0.4, mimic_share=0.8, slides=40,
                       label_noise=0.03),
}


@dataclass(frozen=True)
class Slide:
    """A whole-slide image's look: its stain (per-channel gain and offset, hue shift), focus and sensor noise."""
    gain: np.ndarray
    offset: np.ndarray
    hue_shift: int
    blur_sigma: float
    noise: float
    lymphocytes: tuple


def draw_slide(rng: np.random.Generator) -> Slide:
    low = int(rng.integers(20, 60))
    return Slide(gain=rng.uniform(0.8, 1.15, 3), offset=rng.normal(0, 12, 3), hue_shift=int(rng.integers(-10, 11)),
                 blur_sigma=float(rng.uniform(0.0, 1.4)), noise=float(rng.uniform(2, 12)), lymphocytes=(low, low + 40))


PLAIN_SLIDE = Slide(gain=np.ones(3), offset=np.zeros(3), hue_shift=0, blur_sigma=0.0, noise=0.0, lymphocytes=(25, 60))


def apply_slide_look(image: np.ndarray, slide: Slide, rng: np.random.Generator) -> np.ndarray:
    """The slide's stain, focus and noise on a drawn patch."""
    if slide is PLAIN_SLIDE:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + slide.hue_shift) % 180
    stained = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32) * slide.gain + slide.offset
    if slide.blur_sigma > 0.3:
        stained = cv2.GaussianBlur(stained, (0, 0), slide.blur_sigma)
    stained += rng.normal(0, slide.noise, stained.shape)
    return np.clip(stained, 0, 255).astype(np.uint8)


def random_id(rng: np.random.Generator) -> str:
    """A 40-hex id like Kaggle's (a SHA-1 of random bytes)."""
    return hashlib.sha1(rng.bytes(16)).hexdigest()


def _draw_tissue(rng: np.random.Generator, level: Difficulty, slide: Slide) -> np.ndarray:
    """Pink stroma with smooth stain variation and scattered small dark nuclei (RGB uint8)."""
    base = np.array([225, 160, 200], dtype=np.float32) + rng.normal(0, 10, 3)
    low_freq = cv2.resize(rng.normal(0, 14, (6, 6, 3)).astype(np.float32), (IMAGE_SIZE, IMAGE_SIZE),
                          interpolation=cv2.INTER_CUBIC)
    image = np.clip(base + low_freq + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(*slide.lymphocytes)):
        centre = tuple(int(v) for v in rng.integers(0, IMAGE_SIZE, 2))
        colour = tuple(int(v) for v in np.array([70, 40, 120]) + rng.normal(0, 12, 3))
        cv2.circle(image, centre, int(rng.integers(1, 3)), colour, -1, lineType=cv2.LINE_AA)
    mimic_colour = np.array([165, 115, 195]) if level is LEVELS["easy"] else np.array(level.fill) + 15
    for _ in range(rng.integers(0, 3) if rng.random() < level.mimic_share else 0):
        # mimics: single large pale nuclei (histiocytes) anywhere; a lone cell is not a tumour cluster
        centre = tuple(int(v) for v in rng.integers(8, IMAGE_SIZE - 8, 2))
        colour = tuple(int(v) for v in mimic_colour + rng.normal(0, 10, 3))
        cv2.ellipse(image, centre, (int(rng.integers(3, 6)), int(rng.integers(3, 5))), float(rng.uniform(0, 180)),
                    0, 360, colour, -1, lineType=cv2.LINE_AA)
    return image


def _draw_tumour(image: np.ndarray, rng: np.random.Generator, cluster_centre: np.ndarray,
                 level: Difficulty) -> np.ndarray:
    """Draw a cluster of large, pale, irregular nuclei (most with dark rims); return the boolean tumour mask."""
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    radius = rng.uniform(8, 16)
    for _ in range(rng.integers(*level.nuclei)):
        offset = rng.normal(0, radius / 2, 2)
        x, y = (int(v) for v in np.clip(cluster_centre + offset, 0, IMAGE_SIZE - 1))
        axes = (int(rng.integers(*level.axes)), int(rng.integers(level.axes[0] - 1, level.axes[1] - 2)))
        angle = float(rng.uniform(0, 180))
        fill = tuple(int(v) for v in np.array(level.fill) + rng.normal(0, level.fill_jitter, 3))   # hyperchromatic
        rim = tuple(int(v) for v in np.array([60, 25, 100]) + rng.normal(0, 8, 3))
        cv2.ellipse(image, (x, y), axes, angle, 0, 360, fill, -1, lineType=cv2.LINE_AA)
        if level.rim_share >= 1 or rng.random() < level.rim_share:
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


def make_patch(rng: np.random.Generator, want_positive: bool, level: Difficulty = LEVELS["easy"],
               slide: Slide = PLAIN_SLIDE) -> tuple[np.ndarray, int]:
    """One patch and its label by the competition's rule (tumour pixels inside the centre 32×32)."""
    while True:
        image = _draw_tissue(rng, level, slide)
        if want_positive:
            mask = _draw_tumour(image, rng, rng.uniform(CENTRE_START + 4, CENTRE_START + CENTRE_SIZE - 4, 2), level)
        elif rng.random() < level.off_centre_share:
            low, high = level.off_centre_margin
            margin = low if low == high else int(rng.integers(low, high + 1))
            mask = _draw_tumour(image, rng, _off_centre_point(rng, margin=margin), level)
        else:
            return apply_slide_look(image, slide, rng), 0
        label = int(mask[CENTRE, CENTRE].any())
        if label == int(want_positive):      # redraw the rare cluster that strayed across the boundary
            return apply_slide_look(image, slide, rng), label


def write_patch(path: Path, image_rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        ok, encoded = cv2.imencode(IMAGE_SUFFIX, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(encoded.tobytes())


def make_demo_data(out_dir: str | Path, n_train: int = 1500, n_test: int = 400, seed: int = 0,
                   difficulty: str = "easy") -> Path:
    """Write train/, test/, train_labels.csv and sample_submission.csv (test ids unsorted, label 0); `hard` also
    writes slides.csv and test_labels.csv."""
    level = LEVELS[difficulty]
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    slides = [draw_slide(rng) for _ in range(level.slides)] or [PLAIN_SLIDE]
    for split in (TRAIN_DIR, TEST_DIR):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    rows = []
    with progress_bar(total=n_train + n_test, desc=f"generating {difficulty} data", unit="patch") as bar:
        for split, count in ((TRAIN_DIR, n_train), (TEST_DIR, n_test)):
            for _ in range(count):
                image_id = random_id(rng)
                slide = int(rng.integers(len(slides))) if level.slides else 0
                image, label = make_patch(rng, rng.random() < POSITIVE_SHARE, level, slides[slide])
                write_patch(out_dir / split / f"{image_id}{IMAGE_SUFFIX}", image)
                rows.append((split, image_id, label, f"slide_{slide:03d}"))
                bar.update()
    table = pd.DataFrame(rows, columns=["split", "id", "label", "slide"])
    train, test = table[table["split"] == TRAIN_DIR].copy(), table[table["split"] == TEST_DIR]
    if level.label_noise:                 # annotators' mistakes, in the training labels only
        flipped = rng.random(len(train)) < level.label_noise
        train.loc[flipped, "label"] = 1 - train.loc[flipped, "label"]
    test_ids = test["id"].tolist()
    if test_ids == sorted(test_ids) and len(test_ids) > 1:   # Kaggle's sample is not sorted; keep that property
        test_ids[0], test_ids[-1] = test_ids[-1], test_ids[0]
    atomic_write_csv(out_dir / TRAIN_LABELS_CSV, train[["id", "label"]])
    atomic_write_csv(out_dir / SAMPLE_SUBMISSION_CSV, pd.DataFrame({"id": test_ids, "label": 0}))
    if level.slides:
        atomic_write_csv(out_dir / SLIDES_CSV, train[["id", "slide"]])
        atomic_write_csv(out_dir / TEST_LABELS_CSV, test.set_index("id").loc[test_ids, ["label"]].reset_index())
    return out_dir


def demo_data_is_complete(out_dir: str | Path, n_train: int, n_test: int, difficulty: str = "easy") -> bool:
    """True when both CSVs exist with the expected row counts and every listed image is present (and, for `hard`,
    slides.csv and test_labels.csv)."""
    out_dir = Path(out_dir)
    if LEVELS[difficulty].slides and not all((out_dir / name).is_file() for name in (SLIDES_CSV, TEST_LABELS_CSV)):
        return False
    try:
        train = pd.read_csv(out_dir / TRAIN_LABELS_CSV, dtype={"id": str})
        test = pd.read_csv(out_dir / SAMPLE_SUBMISSION_CSV, dtype={"id": str})
    except (FileNotFoundError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return False
    return (len(train) == n_train and len(test) == n_test
            and all((out_dir / TRAIN_DIR / f"{i}{IMAGE_SUFFIX}").is_file() for i in train["id"])
            and all((out_dir / TEST_DIR / f"{i}{IMAGE_SUFFIX}").is_file() for i in test["id"]))
