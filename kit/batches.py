"""Batches for the model, from the uint8 image cache: two ways to feed training with one interface, and the
gathering and conversion that inference shares. The image cache itself is kit/data.py's.
"""

from __future__ import annotations

import numpy as np
import torch

from . import distributed
from .device import to_device

#
# Two ways to feed training, one interface: `set_seed(epoch seed)`, then iterate (float model inputs, labels) on the
# device, `len()` batches. Both draw the order and every augmentation from that seed, so a resumed run sees the same
# batches as an uninterrupted one:
#   CachedBatches          rows gathered from the uint8 cache (in GPU memory when it fits) and augmented a batch
#                          at a time on the device: no DataLoader, no per-image Python. The fast path.
#   AlbumentationsBatches  per-image albumentations in DataLoader workers (pinned memory, persistent workers), for
#                          transforms without a batch equivalent.

def batches_per_epoch(images: int, batch_size: int) -> int:
    """A ragged last batch is dropped (a 3-image batch would jolt BatchNorm), unless there is only one batch."""
    return images // batch_size if images > batch_size else 1


def gather_batch(images, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (len(rows), 96, 96, 3) on `device`: indexed in place when the split is resident there, else copied out
    of the cache (through pinned memory on a GPU, so the copy overlaps the model's work)."""
    if isinstance(images, torch.Tensor):
        return images.index_select(0, to_device(torch.as_tensor(rows), images.device))
    batch = torch.from_numpy(images[np.asarray(rows)])       # fancy indexing copies: writable, contiguous
    return to_device(batch, device)


def to_model_input(batch: torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C, H, W) in [0, 1] on `device`; the copy travels as uint8 (4× less data)."""
    batch = batch.to(device, non_blocking=True).float().div_(255.0).permute(0, 3, 1, 2)   # NHWC memory = channels_last
    return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def augmented_model_input(batch: torch.Tensor, labels: torch.Tensor, augment, generator: torch.Generator,
                          channels_last: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, C) on the device, through `augment` (a kit.augment.BatchAugmentation) there → float (N, C,
    H, W) in [0, 1], and `labels` in the batch's new order (a D4 move regroups it)."""
    images, labels = augment(batch.permute(0, 3, 1, 2), labels, generator)
    images = (images.float() if images.dtype == torch.uint8 else images).div_(255.0)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), labels


class CachedBatches:
    """Training batches gathered from the uint8 cache and augmented a batch at a time on the device (the fast path).

    `images` is the cache or its resident copy (`resident_images`); labels go to the device once.
    """

    def __init__(self, images, rows: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 augment=None, channels_last: bool = True):
        self.images, self.rows, self.batch_size, self.device = images, np.asarray(rows), batch_size, device
        self.augment, self.channels_last, self.seed = augment, channels_last, 0
        self.labels = torch.as_tensor(labels, dtype=torch.float32).to(device)
        self.ranks = distributed.current()      # under DDP: this rank's equal share of every batch

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return batches_per_epoch(len(self.rows), self.batch_size)

    def __iter__(self):
        """(float NCHW inputs, labels) on the device; order and augmentations come from the seed alone.

        Under DDP every rank draws the same order and takes its slice of each batch (same number of steps on every
        rank); its augmentations come from its own seed (`distributed.rank_seed`)."""
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.rows), generator=generator).numpy()
        if self.ranks.active:
            generator = torch.Generator().manual_seed(distributed.rank_seed(self.seed, self.ranks.rank))
        size = self.batch_size if len(self.rows) > self.batch_size else len(self.rows)
        share, rank = size // self.ranks.world, self.ranks.rank
        for start in range(0, len(self) * size, size):
            picked = order[start:start + size][rank * share:(rank + 1) * share]
            images = gather_batch(self.images, self.rows[picked], self.device)
            labels = self.labels[to_device(torch.as_tensor(picked), self.device)]
            if self.augment is None:
                yield to_model_input(images, self.device, self.channels_last), labels
            else:
                yield augmented_model_input(images, labels, self.augment, generator, self.channels_last)


class PatchDataset(torch.utils.data.Dataset):
    """Patches `indices` of a uint8 image array, each through an albumentations transform, as uint8 HWC tensors."""

    def __init__(self, images: np.ndarray, indices: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.indices, self.labels, self.transform = images, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        image = np.array(self.images[self.indices[item]])   # a writable copy out of the read-only cache
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(self.labels[item], dtype=torch.float32)

    def __getitems__(self, batch: list[tuple[int, int]]):
        """One batch from SeededBatchSampler, as (item, batch seed) pairs: the transform is reseeded once per batch,
        so a batch's augmentations do not depend on which worker makes it, nor on how many there are."""
        if self.transform is not None:
            self.transform.set_random_seed(batch[0][1])
        return [self[item] for item, _ in batch]


class SeededBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of (item, batch seed) pairs, drawn from the seed set by `set_seed` before each epoch."""

    def __init__(self, items: int, batch_size: int):
        self.items, self.batch_size, self.seed = items, batch_size, 0
        self.ranks = distributed.current()      # under DDP: this rank's equal share of every batch, its own seed

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return batches_per_epoch(self.items, self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.items, generator=generator).tolist()
        seeds = torch.randint(2**31, (len(self),), generator=generator).tolist()
        size = self.batch_size if self.items > self.batch_size else self.items
        share, rank = size // self.ranks.world, self.ranks.rank
        for number, seed in enumerate(seeds):
            batch, batch_seed = order[number * size:(number + 1) * size], distributed.rank_seed(seed, rank)
            yield [(item, batch_seed) for item in batch[rank * share:(rank + 1) * share]]


class AlbumentationsBatches:
    """Training batches through an albumentations pipeline per image, in DataLoader workers (persistent across
    epochs, pinned memory on a GPU), for transforms that have no batch equivalent."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, transform, batch_size: int,
                 device: torch.device, workers: int, channels_last: bool = True):
        self.device, self.channels_last = device, channels_last
        self.sampler = SeededBatchSampler(len(rows), batch_size)
        self.loader = torch.utils.data.DataLoader(
            PatchDataset(images, rows, labels, transform), batch_sampler=self.sampler, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0))      # its one draw must not touch the global RNG

    def set_seed(self, seed: int) -> None:
        self.sampler.set_seed(seed)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for images, labels in self.loader:
            yield (to_model_input(images, self.device, self.channels_last),
                   labels.to(self.device, non_blocking=True))
