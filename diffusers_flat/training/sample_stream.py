"""The training sample stream: which images a step trains on, how they are augmented and which rank sees which of
them, a pure function of (seed, step). A resumed run therefore continues exactly where it stopped, and N processes
with batch B see the same global batch as one process with batch N*B.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset

from diffusers_flat.data.images import ImageTransform, open_image
from diffusers_flat.utils.seeding import augmentation_rng, data_order_rng


class TrainingImages(torch.utils.data.Dataset):
    """Images looked up by `(index, augmentation_seed)` keys, as `StepBatchSampler` yields them."""

    def __init__(self, dataset: Dataset, image_column: str, transform: ImageTransform):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, seed = key
        return self.transform(open_image(self.dataset[index][self.image_column]), random.Random(seed))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of `(index, augmentation_seed)` keys for steps `start_step..num_steps-1`.

    Step s trains on positions [s*N, (s+1)*N) of an endless stream of per-epoch shuffles, N = micro_batch_size *
    world_size * accumulation_steps. Micro-batch j of rank r is the slice starting at (j*world_size + r) *
    micro_batch_size, so the global batch does not depend on how it is split.
    """

    def __init__(
        self,
        dataset_size: int,
        micro_batch_size: int,
        *,
        seed: int,
        num_steps: int,
        start_step: int = 0,
        accumulation_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
    ):
        self.n = dataset_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.num_steps = num_steps
        self.start_step = start_step
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size
        self.rank = rank

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation_steps

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of permutations of one sampler, freed with it
    def _permutation(self, epoch: int) -> np.ndarray:
        return data_order_rng(self.seed, epoch).permutation(self.n)

    def step_keys(self, step: int) -> list[tuple[int, int]]:
        """All `(index, augmentation_seed)` keys of step `step`, in global order."""
        positions = np.arange(step * self.samples_per_step, (step + 1) * self.samples_per_step)
        indices = [int(self._permutation(int(p // self.n))[p % self.n]) for p in positions]
        aug_seeds = augmentation_rng(self.seed, step).integers(0, 2**32, len(indices))
        return list(zip(indices, aug_seeds.tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.micro_batch_size
        for step in range(self.start_step, self.num_steps):
            keys = self.step_keys(step)
            for j in range(self.accumulation_steps):
                start = (j * self.world_size + self.rank) * b
                yield keys[start : start + b]

    def __len__(self) -> int:
        return (self.num_steps - self.start_step) * self.accumulation_steps
