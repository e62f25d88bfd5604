"""Where the model looks: the centre evidence share tells a model that reads the centre 32×32 from one that reads the
outer ring, the report shows it (maps over patches, the share, side by side), and ViTs and timm CNNs get maps too."""

import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from test_report import experiment, write_fold

import kit.figures as figures
import kit.report as report
from kit.checkpoints import save_best
from kit.competition import CENTRE_SIZE, CENTRE_START, IMAGE_SIZE, SAMPLE_SUBMISSION_CSV, TRAIN_LABELS_CSV
from kit.config import ModelConfig
from kit.demo_data import random_id, write_patch
from kit.models import PatchClassifier, build_model
from kit.runs import FoldRun
from kit.saliency import UNIFORM_CENTRE_SHARE, centre_share, evidence_maps, target_layer

BLOB_RADIUS = 6
BLOB_COLOUR = (230, 60, 200)          # far outside the noise's 60–140 in red and blue


def draw_blob(image: np.ndarray, rng: np.random.Generator, in_centre: bool) -> None:
    """A bright disc wholly inside the centre 32×32, or wholly outside it (the outer ring)."""
    low, high = CENTRE_START + BLOB_RADIUS, CENTRE_START + CENTRE_SIZE - BLOB_RADIUS
    while True:
        y, x = rng.integers(BLOB_RADIUS, IMAGE_SIZE - BLOB_RADIUS, 2) if not in_centre else rng.integers(low, high, 2)
        outside = not (CENTRE_START - BLOB_RADIUS <= y < CENTRE_START + CENTRE_SIZE + BLOB_RADIUS
                       and CENTRE_START - BLOB_RADIUS <= x < CENTRE_START + CENTRE_SIZE + BLOB_RADIUS)
        if in_centre or outside:
            break
    rows, columns = np.ogrid[:IMAGE_SIZE, :IMAGE_SIZE]
    image[(rows - y) ** 2 + (columns - x) ** 2 <= BLOB_RADIUS ** 2] = BLOB_COLOUR


def patches(count: int, label_follows: str, rng: np.random.Generator, both: bool = False):
    """Noise patches, uint8 (count, 96, 96, 3), and labels. The label follows a blob in the centre (`centre`) or in
    the outer ring (`ring`); a blob in the other place comes at random, so position alone tells the label.
    `both`: every patch has a blob in each place."""
    images = rng.integers(60, 140, (count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, count)
    for image, label in zip(images, labels):
        in_centre = 1 if both else (label if label_follows == "centre" else rng.integers(0, 2))
        in_ring = 1 if both else (label if label_follows == "ring" else rng.integers(0, 2))
        if in_centre:
            draw_blob(image, rng, in_centre=True)
        if in_ring:
            draw_blob(image, rng, in_centre=False)
    return images, labels


def train_baseline(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int = 2) -> PatchClassifier:
    """baseline_bn, Adam 1e-3, batches of 16, in process; BatchNorm's running statistics then measured over the
    training images (16 steps leave them far from the truth, and eval mode would score noise)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="baseline_bn", dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    targets = torch.from_numpy(labels).float()
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(inputs)).split(16):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(inputs[rows]), targets[rows]).backward()
            optimizer.step()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None          # a plain average over the passes below
        for rows in torch.arange(len(inputs)).split(64):
            model(inputs[rows])
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    """Two baseline_bn models, 96 generated patches × 2 epochs each: one whose label follows the centre blob, one
    whose label follows the ring blob."""
    rng = np.random.default_rng(0)
    return {follows: train_baseline(*patches(96, follows, rng), seed=0) for follows in ("centre", "ring")}


def test_the_centre_evidence_share_tells_a_model_that_reads_the_centre_from_one_that_reads_the_ring(trained):
    images, _ = patches(32, "centre", np.random.default_rng(1), both=True)     # the same patches for both models
    shares = {}
    for follows, model in trained.items():
        maps = evidence_maps(model, images)
        assert maps.shape == (32, IMAGE_SIZE, IMAGE_SIZE) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
        shares[follows] = centre_share(maps)
    # seeds 0–7 (data and training) measured 0.61–0.68 (centre) against 0.01–0.09 (ring); a flat map gives 0.111
    assert shares["centre"] > 0.3 and shares["ring"] < 0.15, shares
    assert UNIFORM_CENTRE_SHARE == pytest.approx(0.111, abs=5e-4)
    assert centre_share(np.ones((2, IMAGE_SIZE, IMAGE_SIZE))) == pytest.approx(UNIFORM_CENTRE_SHARE)


def test_the_saliency_gallery_lays_each_map_over_its_patch_and_draws_no_empty_row():
    centre_only = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    centre_only[CENTRE_START:CENTRE_START + CENTRE_SIZE, CENTRE_START:CENTRE_START + CENTRE_SIZE] = 1.0
    flat = np.ones((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    patch = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    oof = pd.DataFrame({"id": ["a" * 40, "b" * 40, "c" * 40], "label": [1, 1, 1], "pred": [0.9, 0.8, 0.2],
                        "fold": [0, 1, 0]})
    rows = [("true positives", oof.iloc[:2], [patch, patch]), ("false positives", oof.iloc[:0], []),
            ("false negatives", oof.iloc[2:], [patch])]
    figure = figures.gallery_figure(rows, maps=[[centre_only, flat], [], [flat]])
    assert len(figure.axes) == 3 and all(len(ax.get_images()) == 2 for ax in figure.axes)   # patch, map over it
    captions = [ax.texts[0].get_text() for ax in figure.axes]
    assert captions[0].endswith("centre 100%") and captions[1].endswith("centre 11%")
    row_titles = [text.get_text() for text in figure.texts]
    assert row_titles == ["true positives", "false negatives"]           # the empty kind draws no row
    one_row = figures.gallery_figure(rows[:1], maps=[[centre_only, flat]])
    assert figure.get_figheight() == pytest.approx(2 * one_row.get_figheight())
    figures.plt.close("all")


def write_data(folder, images: np.ndarray, labels: np.ndarray, rng) -> list[str]:
    """The Kaggle layout around `images`: train/*.tif, train_labels.csv, one test patch, sample_submission.csv."""
    ids = [random_id(rng) for _ in images]
    for image_id, image in zip(ids, images):
        write_patch(folder / "train" / f"{image_id}.tif", image)
    test_id = random_id(rng)
    write_patch(folder / "test" / f"{test_id}.tif", images[0])
    pd.DataFrame({"id": ids, "label": labels}).to_csv(folder / TRAIN_LABELS_CSV, index=False)
    pd.DataFrame({"id": [test_id], "label": [0]}).to_csv(folder / SAMPLE_SUBMISSION_CSV, index=False)
    return ids


def write_trained_run(cfg, model, ids, images, labels) -> pd.DataFrame:
    """A finished 2-fold run whose folds' best.pt both hold `model`; oof.csv holds its own scores."""
    with torch.no_grad():
        scores = torch.sigmoid(model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)).numpy()
    oof = pd.DataFrame({"id": ids, "label": labels, "pred": scores, "fold": np.arange(len(ids)) % 2})
    for fold, rows in oof.groupby("fold"):
        write_fold(cfg, fold, rows)
        save_best(FoldRun(cfg, fold), cfg, fold, model, epoch=cfg.epochs, val_auc=0.9)
    return oof


def test_the_report_shows_where_the_folds_look_and_the_comparison_which_experiment_reads_the_centre(
        trained, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    images, labels = patches(48, "centre", rng)
    data = tmp_path / "data"
    ids = write_data(data, images, labels, rng)
    centre, ring = experiment(tmp_path, data, n_splits=2), experiment(tmp_path, data, name="ring", n_splits=2)
    oof = write_trained_run(centre, trained["centre"], ids, images, labels)
    write_trained_run(ring, trained["ring"], ids, images, labels)
    assert (oof["pred"] >= 0.5).sum() >= 8, "the share needs patches called tumour"

    logged = []
    path = report.write_report(centre, target_sensitivity=0.95, gallery_size=3, saliency_images=8,
                               log=logged.append)
    page = path.read_text()
    figure = path.parent / "saliency.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    assert "## Where the model looks" in page and "](saliency.png)" in page and "`net.11`" in page
    (line,) = [line for line in logged if "centre evidence share" in line]
    share = float(re.search(r"centre evidence share ([\d.]+) \(over 16 validation patches", line).group(1))
    assert share > 0.3 and f"a flat map gives {UNIFORM_CENTRE_SHARE:.3f}" in line
    assert f"**{share:.3f}**" in page and "| 0 | 8 |" in page and "| 1 | 8 |" in page

    logged = []
    path = report.write_comparison([centre, ring], target_sensitivity=0.95, saliency_images=8, log=logged.append)
    page = path.read_text()
    rows = {name: next(line for line in page.splitlines() if line.startswith(f"| [{name}]") or
                       line.startswith(f"| {name} |")) for name in ("demo", "ring")}
    shares = {name: float(re.fullmatch(r"\| ([\d.]+) \(16\) \|", row[row.rindex("| ", 0, -2):]).group(1))
              for name, row in rows.items()}
    assert shares["demo"] == pytest.approx(share) and shares["ring"] < 0.15
    assert f"centre evidence share {shares['ring']:.3f}" in logged[1] and "0.111" in page

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)           # grad-cam not installed
    page = report.write_comparison([centre, ring], target_sensitivity=0.95, log=lambda *_: None).read_text()
    assert "- `ring`: no centre evidence share: the maps of where the model looks need the grad-cam package: " \
           "pip install 'grad-cam>=1.5.7'" in page


def test_vision_transformers_get_maps_on_their_patch_grid_and_timm_cnns_on_their_last_feature_map():
    from timm.models.vision_transformer import VisionTransformer

    images, _ = patches(2, "centre", np.random.default_rng(3), both=True)
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=IMAGE_SIZE, patch_size=16, embed_dim=48, depth=2, num_heads=3, reg_tokens=4,
                            num_classes=1)                      # a class token and 4 registers before 6 × 6 patches
    model = PatchClassifier(vit, mean=(0.5,) * 3, std=(0.25,) * 3)
    layer, reshape = target_layer(model)
    assert layer is vit.blocks[-1].norm1 and vit.num_prefix_tokens == 5
    tokens = torch.arange(2 * 41 * 3, dtype=torch.float32).reshape(2, 41, 3)
    grid = reshape(tokens)
    assert grid.shape == (2, 3, 6, 6) and torch.equal(grid[:, :, 2, 4], tokens[:, 5 + 2 * 6 + 4, :])
    model.requires_grad_(False)            # every weight frozen (frozen features): the maps still need gradients
    maps = evidence_maps(model, images)
    assert maps.shape == (2, IMAGE_SIZE, IMAGE_SIZE) and np.isfinite(maps).all() and maps.max() > 0

    resnet = build_model(ModelConfig(name="resnet10t", dropout=0.0))
    layer, reshape = target_layer(resnet)
    assert layer is resnet.net.layer4 and reshape is None
    assert evidence_maps(resnet, images).shape == (2, IMAGE_SIZE, IMAGE_SIZE)
