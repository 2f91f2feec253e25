"""The real images a model is compared with: a run's training set, prepared as in training."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset

from diffusers_flat.data import fashion_mnist
from diffusers_flat.data.images import ImageTransform, load_image_dataset, open_image, subset_indices
from diffusers_flat.run_directory import DataSource


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
        held_out: (M, H, W, C) uint8 images of a held-out split (Fashion-MNIST's test set), or None. When given,
            FID and KID compare with these, never with the training images.
    """

    uint8: np.ndarray
    tensors: torch.Tensor
    key: dict
    training: np.ndarray | None = None
    held_out: np.ndarray | None = None

    def training_images(self) -> RealImages:
        """The images the model trained on."""
        if self.training is None:
            return self
        chosen = self.training
        key = {**self.key, "training": len(chosen)}
        return RealImages(self.uint8[chosen], self.tensors[torch.from_numpy(chosen)], key, None, self.held_out)

    def order(self, seed: int) -> np.ndarray:
        """A fixed random order of the images: the same subsets serve every model evaluated with `seed`."""
        return np.random.default_rng(seed).permutation(len(self.uint8))

    def fid_subset(self, num_real: int, seed: int) -> np.ndarray:
        """At most `num_real` of the images FID compares with (the held-out split when there is one), a random
        subset in dataset order."""
        pool = self.uint8 if self.held_out is None else self.held_out
        return pool[np.sort(np.random.default_rng(seed).permutation(len(pool))[:num_real])]

    def tensor_subset(self, count: int, seed: int) -> torch.Tensor:
        """The first `count` images of the fixed random order."""
        return self.tensors[torch.from_numpy(self.order(seed)[:count])]


def load_real_images(source: DataSource, resolution: int, channels: int) -> RealImages:
    """All images of a training set as a model of `resolution` and `channels` saw them (centre crop, no flip), and
    for Fashion-MNIST its test set, which FID and KID compare with.

    Args:
        source: the dataset (a run's `training_config(run).data`).
        resolution: the model's image size.
        channels: the model's channels (1 or 3).

    Example:
        >>> real = load_real_images(DataSource(), 16, 1)  # the embedded digits
        >>> real.uint8.shape, real.tensors.shape
        ((1797, 16, 16, 1), torch.Size([1797, 1, 16, 16]))
    """
    transform = ImageTransform(resolution, center_crop=True, channels=channels)

    def load(split: str) -> Dataset:
        names = (source.dataset_name, source.dataset_config_name, source.train_data_dir, source.image_column)
        return load_image_dataset(*names, split=split)[0]

    def prepared(dataset: Dataset) -> tuple[torch.Tensor, np.ndarray]:
        images = [transform(open_image(record), random.Random(0)) for record in dataset[source.image_column]]
        tensors = torch.stack(images)
        return tensors, ((tensors + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    dataset = load(source.dataset_split)
    # the key names the whole dataset: models trained on subsets of it share its FID statistics
    everything = {name: value for name, value in source.__dict__.items() if not name.startswith("train_subset")}
    key = {"dataset": dataset._fingerprint, "source": everything, "resolution": resolution, "channels": channels}
    subset = source.train_subset
    training = None if subset is None else subset_indices(len(dataset), subset, source.train_subset_seed)
    held_out = None
    if source.dataset_name == fashion_mnist.NAME and source.dataset_split != fashion_mnist.HELD_OUT:
        test = load(fashion_mnist.HELD_OUT)
        _, held_out = prepared(test)
        key["held_out"] = test._fingerprint
        if training is not None:  # FID compares with the held-out split: only the training images are needed
            dataset, training = dataset.select(training), None
    tensors, uint8 = prepared(dataset)
    return RealImages(uint8, tensors, key, training, held_out)
