"""The seed streams, against numpy's SeedSequence and default_rng used by hand: each stream is the documented pure
function of (seed, position), and the streams of one step are distinct."""

import numpy as np
import torch

from diffusers_flat.training.sample_stream import StepBatchSampler
from diffusers_flat.training.step import draw_step_noise
from diffusers_flat.utils.seeding import (
    augmentation_rng,
    data_order_rng,
    derived_seed,
    dropout_seed,
    sampling_generator,
    step_noise_generator,
)


def by_hand(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def test_each_stream_is_its_documented_function_of_seed_and_position():
    assert derived_seed(7, 3) == by_hand(7, 3) and derived_seed(7, 3) != derived_seed(3, 7)
    expected = torch.randn(4, generator=torch.Generator().manual_seed(by_hand(5, 11)))
    torch.testing.assert_close(torch.randn(4, generator=sampling_generator(5, 11)), expected, rtol=0, atol=0)
    expected = torch.randn(4, generator=torch.Generator().manual_seed(by_hand(5, 11, 2)))
    torch.testing.assert_close(torch.randn(4, generator=step_noise_generator(5, 11)), expected, rtol=0, atol=0)
    assert dropout_seed(5, 11, 1) == by_hand(5, 11, 3, 1) != dropout_seed(5, 11, 0)
    assert (data_order_rng(5, 2).permutation(10) == np.random.default_rng([5, 2]).permutation(10)).all()
    assert augmentation_rng(5, 2).integers(0, 100) == np.random.default_rng([5, 2, 1]).integers(0, 100)


def test_training_draws_from_the_named_streams():
    """A step's noise is the first draw of its stream, and a sampler's epoch order is its epoch's permutation."""
    noise, _, _ = draw_step_noise(3, 4, 6, (1, 2, 2), 1000)
    torch.testing.assert_close(noise, torch.randn((6, 1, 2, 2), generator=step_noise_generator(3, 4)))
    sampler = StepBatchSampler(10, 5, seed=3, num_steps=2)
    first_epoch = [index for step in range(2) for index, _ in sampler.step_keys(step)]
    assert first_epoch == data_order_rng(3, 0).permutation(10).tolist()
