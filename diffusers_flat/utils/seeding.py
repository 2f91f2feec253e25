"""The seed streams, named once. Every random draw of training and evaluation is a pure function of a user's seed and
a position (epoch, step, image index), so a resumed run, another batch size or another process count draws what a
straight run would:

- data order: the permutation of epoch e, `data_order_rng(seed, e)`;
- augmentation: the flips of step s, `augmentation_rng(seed, s)`;
- step noise: the noise, timesteps and IP perturbation of step s, `step_noise_generator(seed, s)`;
- dropout: the global generators dropout draws from at step s on rank r, `dropout_seed(seed, s, r)`;
- weight noise: the random SAM mode's perturbation of step s, the same on every rank,
  `weight_noise_generator(seed, s)`;
- sampling noise: everything image i of a sample stream draws (x_T and each step's noise),
  `sampling_generator(seed, i)`.
"""

from __future__ import annotations

import numpy as np
import torch

# The tags that keep the per-step streams apart (the values fix the streams: changing one changes every result).
AUGMENTATION, STEP_NOISE, DROPOUT, WEIGHT_NOISE = 1, 2, 3, 4


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of `keys` (numpy's SeedSequence hashes them)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def data_order_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of epoch `epoch`'s permutation of the training images."""
    return np.random.default_rng([seed, epoch])


def augmentation_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of step `step`'s per-image augmentation seeds."""
    return np.random.default_rng([seed, step, AUGMENTATION])


def step_noise_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step `step`'s noise, timesteps and input perturbation (all samples of all ranks)."""
    return torch.Generator().manual_seed(derived_seed(seed, step, STEP_NOISE))


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global generators (which dropout draws from) at step `step` on rank `rank`."""
    return derived_seed(seed, step, DROPOUT, rank)


def weight_noise_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of step `step`'s weight noise (the random SAM mode), the same on every rank."""
    return torch.Generator().manual_seed(derived_seed(seed, step, WEIGHT_NOISE))


def sampling_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image `index` of the sample stream `seed`: its x_T and every step's noise."""
    return torch.Generator().manual_seed(derived_seed(seed, index))
