"""ADM's loss-second-moment timestep sampler against a hand computation, its importance weights, and the draws."""

import pytest
import torch

from diffusers_flat.methods.timestep_sampler import LossSecondMomentSampler, importance_weights
from diffusers_flat.training.step import draw_step_noise


def test_uniform_until_every_timestep_has_its_history():
    sampler = LossSecondMomentSampler(3, history=2)
    sampler.update(torch.tensor([0, 1, 2, 0, 1]), torch.tensor([5.0, 1.0, 1.0, 5.0, 1.0]))
    assert not sampler.warmed_up
    torch.testing.assert_close(sampler.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_probabilities_follow_the_root_mean_square_of_the_last_losses():
    sampler = LossSecondMomentSampler(3, history=2, uniform_prob=0.1)
    # t = 0 sees 9, then 1 and 3 (the 9 falls out); t = 1 sees 2, 2; t = 2 sees 0, 4
    sampler.update(torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.tensor([9.0, 2.0, 0.0, 1.0, 2.0, 4.0, 3.0]))
    rms = torch.tensor([(1 + 9) / 2, (4 + 4) / 2, (0 + 16) / 2], dtype=torch.float64).sqrt()
    expected = 0.9 * rms / rms.sum() + 0.1 / 3
    torch.testing.assert_close(sampler.probabilities(), expected)
    assert sampler.probabilities().sum().item() == pytest.approx(1.0)


def test_importance_weights_keep_the_uniform_expectation():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    loss_at = torch.tensor([1.0, 4.0, 2.0, 8.0], dtype=torch.float64)
    weights = importance_weights(p, torch.arange(4)).double()
    assert (p * weights * loss_at).sum().item() == pytest.approx(loss_at.mean().item())


def test_drawn_timesteps_follow_the_probabilities_and_are_a_function_of_seed_and_step():
    p = torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64)
    _, timesteps, _ = draw_step_noise(0, 5, 20000, (1, 1, 1), 4, timestep_probabilities=p)
    frequencies = torch.bincount(timesteps, minlength=4).double() / 20000
    torch.testing.assert_close(frequencies, p, atol=0.01, rtol=0)
    again = draw_step_noise(0, 5, 20000, (1, 1, 1), 4, timestep_probabilities=p)[1]
    assert torch.equal(timesteps, again)


def test_state_round_trip():
    sampler = LossSecondMomentSampler(4, history=1)
    sampler.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    copy = LossSecondMomentSampler(4, history=1)
    copy.load_state_dict(sampler.state_dict())
    assert copy.warmed_up and torch.equal(copy.probabilities(), sampler.probabilities())
