"""The fast input path (kit/augment.py's batch ops): batch augmentation against the albumentations transforms it
replaces, the input path choice, the batch feeds, and the two training paths against each other."""

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from kit.augment import ROT90_ELEMENTS, apply_d4, batch_equivalent, build_transform, choose_input
from kit.batches import AlbumentationsBatches, CachedBatches
from kit.config import histology_augmentation, load_config
from kit.errors import KitError
from kit.fold import train_fold

from conftest import REPO

D4 = [{"name": name, "p": 0.5} for name in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "Transpose")]


def random_images(count: int, seed: int = 0, smooth: bool = False) -> np.ndarray:
    images = np.random.default_rng(seed).integers(0, 256, (count, 96, 96, 3), dtype=np.uint8)
    return np.stack([cv2.GaussianBlur(image, (0, 0), 3) for image in images]) if smooth else images


def batch_augment(specs, images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The batch path on `images` (N, H, W, 3): float pixel values (N, H, W, 3) put back in input order, and which
    input each output row came from before that (the labels that travelled with the batch)."""
    augment = batch_equivalent(build_transform(specs, "augment.train"), "augment.train")
    moved, origin = augment(torch.from_numpy(images).permute(0, 3, 1, 2), torch.arange(len(images)),
                            torch.Generator().manual_seed(seed))
    in_order = torch.empty(moved.shape, dtype=torch.float32)
    in_order[origin] = moved.float()
    return in_order.permute(0, 2, 3, 1).numpy(), origin.numpy()


def albumentations_augment(specs, images: np.ndarray) -> np.ndarray:
    transform = build_transform(specs, "augment.train", seed=0)
    return np.stack([transform(image=image)["image"] for image in images]).astype(np.float32)


# ---- batch augmentation against the per-image transforms -----------------------------------------------------------

def test_flips_turns_and_transposes_equal_albumentations_exactly():
    images = random_images(6)
    chain = [{"name": "HorizontalFlip", "p": 1.0}, {"name": "Transpose", "p": 1.0}, {"name": "VerticalFlip", "p": 1.0}]
    assert np.array_equal(batch_augment(chain, images)[0], albumentations_augment(chain, images))
    for k, element in enumerate(ROT90_ELEMENTS):                       # what RandomRotate90 draws, by hand
        turned, _ = apply_d4(torch.from_numpy(images).permute(0, 3, 1, 2), torch.arange(6), torch.full((6,), element))
        assert np.array_equal(turned.permute(0, 2, 3, 1).numpy(), np.stack([np.rot90(image, k) for image in images]))


def test_random_d4_ops_draw_each_image_its_own_element_with_probability_p():
    images = random_images(400)
    flipped, _ = batch_augment([{"name": "HorizontalFlip", "p": 0.3}], images)
    is_flipped = [np.array_equal(out, image[:, ::-1]) for out, image in zip(flipped, images)]
    assert all(f or np.array_equal(out, image) for f, out, image in zip(is_flipped, flipped, images))
    assert 0.24 < np.mean(is_flipped) < 0.36
    turned, _ = batch_augment([{"name": "RandomRotate90", "p": 1.0}], images)
    turns = [next(k for k in range(4) if np.array_equal(out, np.rot90(image, k))) for out, image in zip(turned, images)]
    assert all(70 < count < 130 for count in np.bincount(turns, minlength=4))          # k = 0..3 uniformly


@pytest.mark.parametrize("spec", [
    {"name": "Affine", "rotate": [10, 10], "scale": [1.1, 1.1], "translate_percent": [0.03, 0.03], "border_mode": 4},
    {"name": "Affine", "rotate": [-20, -20], "scale": [0.9, 0.9], "shear": [4, 4], "border_mode": 0},
    {"name": "Affine", "scale": [0.95, 0.95], "translate_px": [3, 3], "border_mode": 1},
    {"name": "RandomBrightnessContrast", "brightness_limit": [0.1, 0.1], "contrast_limit": [0.2, 0.2]},
    {"name": "RandomBrightnessContrast", "brightness_limit": [-0.1, -0.1], "contrast_limit": [-0.2, -0.2],
     "brightness_by_max": False},
    {"name": "HueSaturationValue", "hue_shift_limit": [6, 6], "sat_shift_limit": [10, 10], "val_shift_limit": [-8, -8]},
    {"name": "HueSaturationValue", "hue_shift_limit": [-20, -20], "sat_shift_limit": [-30, -30],
     "val_shift_limit": [15, 15]},
], ids=lambda spec: spec["name"])
def test_affine_and_colour_ops_match_albumentations_with_fixed_parameters(spec):
    images = random_images(6, smooth=True)
    difference = np.abs(batch_augment([{**spec, "p": 1.0}], images)[0] - albumentations_augment([{**spec, "p": 1.0}],
                                                                                                 images))
    # albumentations rounds to uint8 and OpenCV interpolates/converts in fixed point: within a few levels of 255
    assert difference.mean() < 0.6 and difference.max() < 4, (difference.mean(), difference.max())


def test_the_default_pipeline_changes_images_as_albumentations_does():
    images = random_images(400, seed=1, smooth=True)
    batch, _ = batch_augment(histology_augmentation(), images)
    reference = albumentations_augment(histology_augmentation(), images)
    for name, statistic in (("brightness change", lambda out: out.mean((1, 2, 3)) - images.mean((1, 2, 3))),
                            ("mean absolute change", lambda out: np.abs(out - images).mean((1, 2, 3)))):
        ours, theirs = statistic(batch), statistic(reference)
        assert abs(ours.mean() - theirs.mean()) < 0.25 * theirs.std() + 0.01, name
        assert 0.75 < ours.std() / theirs.std() < 1.33, name


def centre_mask_images(count: int) -> np.ndarray:
    images = np.zeros((count, 96, 96, 3), np.uint8)
    images[:, 32:64, 32:64] = 255
    return images


def test_batch_augmentation_keeps_labels_with_their_images_and_the_centre_in_the_centre():
    # positives: a bright centre on a dark ground; negatives: the reverse. The D4 move regroups the batch, so a
    # label that did not travel with its image would land on the other kind.
    labels = torch.from_numpy(np.random.default_rng(2).integers(0, 2, 256))
    images = centre_mask_images(256)
    images[labels.numpy() == 0] = 255 - images[labels.numpy() == 0]
    augment = batch_equivalent(build_transform(histology_augmentation(), "augment.train"), "augment.train")
    moved, carried = augment(torch.from_numpy(images).permute(0, 3, 1, 2), labels, torch.Generator().manual_seed(0))
    centre_brighter = moved[:, :, 32:64, 32:64].mean((1, 2, 3)) > moved.mean((1, 2, 3))
    assert not torch.equal(carried, labels), "the batch was regrouped"
    assert torch.equal(centre_brighter, carried.bool())

    masks = centre_mask_images(256)
    d4_only, _ = batch_augment(D4, masks)
    assert np.array_equal(d4_only, masks), "D4 maps the centre 32×32 onto itself"
    full, _ = batch_augment(histology_augmentation(), masks)
    assert (full[:, 32:64, 32:64].mean(-1) > 128).mean((1, 2)).min() >= 2 / 3


def test_input_path_choice():
    assert choose_input("auto", build_transform(histology_augmentation(), "augment.train"), "augment.train").path \
        == "batch"
    blur = build_transform(D4 + [{"name": "GaussianBlur", "p": 0.5}], "augment.train")
    choice = choose_input("auto", blur, "augment.train")
    assert choice.path == "albumentations" and "`augment.train[4]` GaussianBlur" in choice.why
    with pytest.raises(KitError, match=r"`train.input: batch`, but `augment.train\[4\]` GaussianBlur"):
        choose_input("batch", blur, "augment.train")
    wrap = build_transform([{"name": "Affine", "rotate": [-5, 5], "border_mode": 3}], "augment.train")
    assert "border_mode 3" in choose_input("auto", wrap, "augment.train").why
    assert choose_input("albumentations", None, "augment.train").path == "albumentations"
    with pytest.raises(KitError, match="`train.input` must be one of auto, batch, albumentations"):
        load_config(REPO / "configs" / "demo.yaml", {"train.input": "fast"})


# ---- the batch feeds -----------------------------------------------------------------------------------------------

def epoch(batches, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches.set_seed(seed)
    return list(batches)


def test_cached_batches_depend_on_the_epoch_seed_alone_and_cover_every_row():
    images, rows = random_images(100, seed=4), np.arange(10, 90)
    batches = CachedBatches(images, rows, rows.astype(np.float32), 16, torch.device("cpu"),
                            batch_equivalent(build_transform(histology_augmentation(), "augment.train"), "k"))
    first, again, other = epoch(batches, 7), epoch(batches, 7), epoch(batches, 8)
    assert len(first) == len(batches) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    assert sorted(torch.cat([labels for _, labels in first]).int().tolist()) == list(range(10, 90))
    inputs = first[0][0]
    assert inputs.shape == (16, 3, 96, 96) and inputs.dtype == torch.float32 and 0 <= inputs.min() <= inputs.max() <= 1
    assert inputs.is_contiguous(memory_format=torch.channels_last)


def test_albumentations_batches_do_not_depend_on_the_number_of_workers():
    images, rows = random_images(40, seed=5), np.arange(40)
    transform = build_transform(histology_augmentation(), "augment.train")
    in_process = AlbumentationsBatches(images, rows, rows.astype(np.float32), transform, 8, torch.device("cpu"), 0)
    two_workers = AlbumentationsBatches(images, rows, rows.astype(np.float32), transform, 8, torch.device("cpu"), 2)
    first, parallel, other = epoch(in_process, 3), epoch(two_workers, 3), epoch(in_process, 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, parallel))
    assert len(first) == 5 and not torch.equal(first[0][0], other[0][0])


# ---- training and the benchmark ------------------------------------------------------------------------------------

def test_fast_path_and_albumentations_path_train_to_comparable_auc(quick_config, tmp_path):
    aucs = {}
    for path in ("batch", "albumentations"):
        cfg = quick_config(epochs=3, batch_size=16, **{"train.input": path, "augment.train": D4,
                                                       "out_dir": str(tmp_path / path)})
        messages = []
        aucs[path] = train_fold(cfg, fold=0, log=messages.append)["best_val_auc"]
        used = "augmented a batch at a time" if path == "batch" else "albumentations per image"
        assert any(used in message for message in messages), messages
    assert min(aucs.values()) > 0.9 and abs(aucs["batch"] - aucs["albumentations"]) < 0.05, aucs


# ---- H&E stain augmentation (albumentations' HEStain) --------------------------------------------------------------

def tissue_and_background_images(count: int, seed: int = 0) -> np.ndarray:
    """Smooth stained-looking tissue on the right, near-white glass (HEStain's background, left alone) on the left."""
    images = random_images(count, seed=seed, smooth=True).astype(np.int16)
    images[:, :, :48] += 110
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("spec", [
    {"method": "preset", "preset": "standard", "intensity_scale_range": [1.2, 1.2], "intensity_shift_range": [-0.1, -0.1]},
    {"method": "preset", "preset": "e_heavy", "intensity_scale_range": [0.7, 0.7], "intensity_shift_range": [0.15, 0.15],
     "augment_background": True},
    {"method": "preset", "preset": "light", "intensity_scale_range": [1.0, 1.0], "intensity_shift_range": [0.0, 0.0]},
], ids=lambda spec: f"{spec['preset']}{'-background' if spec.get('augment_background') else ''}")
def test_he_stain_matches_albumentations_up_to_its_uint8_rounding(spec):
    images = tissue_and_background_images(6)
    transform = build_transform([{"name": "HEStain", **spec, "p": 1.0}], "augment.train", seed=0)
    expected = np.stack([transform(image=image)["image"] for image in images]).astype(np.float32)
    assert np.abs(expected - images).mean() > 5, "the stain change is visible"
    batch = batch_equivalent(transform, "augment.train")(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                          torch.arange(6), torch.Generator())[0]
    difference = np.abs(batch.permute(0, 2, 3, 1).numpy() - expected)
    assert difference.max() <= 0.501, difference.max()      # albumentations rounds to uint8; nothing else differs


def test_he_stain_changes_the_background_only_when_asked():
    images = torch.from_numpy(tissue_and_background_images(4)).permute(0, 3, 1, 2)

    def stained(scale: float, shift: float, augment_background: bool = False) -> np.ndarray:
        augment = batch_equivalent(A.Compose([A.HEStain(method="preset", preset="standard", p=1.0,
                                                        intensity_scale_range=(scale, scale),
                                                        intensity_shift_range=(shift, shift),
                                                        augment_background=augment_background)]), "k")
        return augment(images, torch.arange(4), torch.Generator())[0].permute(0, 2, 3, 1).numpy()

    tissue_only, everywhere, unchanged_stain = stained(1.3, 0.2), stained(1.3, 0.2, True), stained(1, 0)
    # the glass keeps its stain concentrations (it is only projected onto the stain plane, as every pixel is);
    # tissue, and with augment_background the glass too, darkens by the stain added
    assert np.allclose(tissue_only[:, :, :40], unchanged_stain[:, :, :40], atol=1e-3)
    assert (unchanged_stain[:, :, 56:] - tissue_only[:, :, 56:]).mean() > 20
    assert (unchanged_stain[:, :, :40] - everywhere[:, :, :40]).mean() > 20


def test_random_preset_he_stain_draws_presets_uniformly_and_changes_images_as_albumentations_does():
    tiny = torch.randint(40, 200, (800, 3, 4, 4), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)

    def stained(**method):        # the batch op alone (build_transform's centre probe costs more than the work)
        augment = batch_equivalent(A.Compose([A.HEStain(**method, intensity_scale_range=(1.3, 1.3),
                                                        intensity_shift_range=(0.1, 0.1), p=1.0)]), "k")
        return augment(tiny, torch.arange(len(tiny)), torch.Generator().manual_seed(0))[0].numpy()

    drawn = stained(method="random_preset")
    names = A.HEStain().preset_names
    by_preset = np.stack([stained(method="preset", preset=name) for name in names])
    nearest = np.abs(by_preset - drawn).max((2, 3, 4)).argmin(0)
    assert np.abs(by_preset[nearest, np.arange(len(tiny))] - drawn).max() < 1e-3, "each image got one preset"
    assert all(70 < count < 130 for count in np.bincount(nearest, minlength=len(names))), np.bincount(nearest)

    images = tissue_and_background_images(400, seed=3)[:, 24:72, 24:72]              # glass and tissue, smaller
    spec = [{"name": "HEStain", "method": "random_preset", "p": 0.5}]                 # albumentations' default ranges
    batch, _ = batch_augment(spec, images)
    reference = albumentations_augment(spec, images)
    for name, statistic in (("brightness change", lambda out: out.mean((1, 2, 3)) - images.mean((1, 2, 3))),
                            ("mean absolute change", lambda out: np.abs(out - images).mean((1, 2, 3)))):
        ours, theirs = statistic(batch), statistic(reference)
        assert abs(ours.mean() - theirs.mean()) < 0.25 * theirs.std() + 0.01, name
        assert 0.75 < ours.std() / theirs.std() < 1.33, name


def test_he_stain_takes_the_batch_path_with_presets_and_albumentations_when_it_estimates_the_stain():
    preset = build_transform(histology_augmentation() + [{"name": "HEStain", "method": "random_preset"}], "augment.train")
    assert choose_input("auto", preset, "augment.train").path == "batch"
    macenko = A.Compose([A.HorizontalFlip(), A.VerticalFlip(), A.RandomRotate90(), A.Transpose(),
                         A.HEStain(method="macenko")])
    choice = choose_input("auto", macenko, "augment.train")
    assert choice.path == "albumentations"
    assert "`augment.train[4]` HEStain: method macenko estimates a stain matrix per image" in choice.why
    with pytest.raises(KitError, match=r"`train.input: batch`, but `augment.train\[4\]` HEStain: method macenko"):
        choose_input("batch", macenko, "augment.train")
