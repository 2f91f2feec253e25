"""The real images a model is compared with: a run's training set, prepared as in training."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from diffusers_flat.run_directory import DataSource
from diffusers_flat.training.data import ImageTransform, load_image_dataset, open_image, subset_indices


@dataclass(frozen=True)
class RealImages:
    """The real images a model is compared with, prepared as in training (centre crop, no flip).

    Args:
        uint8: (N, H, W, C) uint8 pixels, for FID.
        tensors: (N, C, H, W) float in [-1, 1].
        key: what identifies the images for the FID statistics cache (dataset fingerprint, source, size, channels).
        training: the indices of the images the model trained on (a `--train_subset`), or None: all of them.
            FID compares with all the images; the losses, exposure bias, memorization and the empirical denoiser
            use the training images (`training_images`).
    """

    uint8: np.ndarray
    tensors: torch.Tensor
    key: dict
    training: np.ndarray | None = None

    def training_images(self) -> RealImages:
        """The images the model trained on."""
        if self.training is None:
            return self
        chosen = self.training
        return RealImages(
            self.uint8[chosen], self.tensors[torch.from_numpy(chosen)], {**self.key, "training": len(chosen)}
        )

    def order(self, seed: int) -> np.ndarray:
        """A fixed random order of the images: the same subsets serve every model evaluated with `seed`."""
        return np.random.default_rng(seed).permutation(len(self.uint8))

    def fid_subset(self, num_real: int, seed: int) -> np.ndarray:
        """At most `num_real` images, a random subset in dataset order."""
        return self.uint8[np.sort(self.order(seed)[:num_real])]

    def tensor_subset(self, count: int, seed: int) -> torch.Tensor:
        """The first `count` images of the fixed random order."""
        return self.tensors[torch.from_numpy(self.order(seed)[:count])]


def load_real_images(source: DataSource, resolution: int, channels: int) -> RealImages:
    """All images of a training set as a model of `resolution` and `channels` saw them (centre crop, no flip).

    Args:
        source: the dataset (a run's `TrainingRecord.data`).
        resolution: the model's image size.
        channels: the model's channels (1 or 3).

    Example:
        >>> real = load_real_images(DataSource(), 16, 1)  # the embedded digits
        >>> real.uint8.shape, real.tensors.shape
        ((1797, 16, 16, 1), torch.Size([1797, 1, 16, 16]))
    """
    dataset, _ = load_image_dataset(
        source.dataset_name, source.dataset_config_name, source.train_data_dir, source.image_column
    )
    transform = ImageTransform(resolution, center_crop=True, channels=channels)
    tensors = torch.stack([transform(open_image(record), random.Random(0)) for record in dataset[source.image_column]])
    uint8 = ((tensors + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # the key names the whole dataset: models trained on subsets of it share its FID statistics
    everything = {name: value for name, value in source.__dict__.items() if not name.startswith("train_subset")}
    key = {"dataset": dataset._fingerprint, "source": everything, "resolution": resolution, "channels": channels}
    subset = source.train_subset
    training = None if subset is None else subset_indices(len(tensors), subset, source.train_subset_seed)
    return RealImages(uint8, tensors, key, training)
