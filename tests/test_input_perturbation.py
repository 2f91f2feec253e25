"""DDPM-IP: x_t = sqrt(abar) x0 + sqrt(1 - abar) (eps + gamma xi), target eps."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_flat.methods.input_perturbation import noisy_input_and_target
from diffusers_flat.training.step import draw_step_noise

# alpha-bar of the linear schedule, computed here without diffusers.
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def implied_noise(noisy, clean, t):
    a = torch.tensor(ABAR[t], dtype=torch.float32)
    return (noisy - a.sqrt() * clean) / (1 - a).sqrt()


@pytest.mark.parametrize("gamma", [0.1, 0.15])
def test_noisy_input_carries_gamma_xi_and_target_stays_eps(gamma):
    n, t = 4096, 500
    noise, _, perturbation = draw_step_noise(0, 7, n, (1, 4, 4), 1000, gamma)
    xi = perturbation / gamma  # drawn already scaled by gamma
    assert abs(xi.std().item() - 1) < 0.005
    clean = torch.full((n, 1, 4, 4), 0.3)
    timesteps = torch.full((n,), t)
    noisy, target = noisy_input_and_target(DDPMScheduler(), clean, noise, timesteps, perturbation)
    assert torch.equal(target, noise)
    residual = implied_noise(noisy, clean, t) - noise  # should be gamma * xi
    torch.testing.assert_close(residual, gamma * xi, rtol=1e-3, atol=1e-4)
    # Statistically: the noise the network sees has variance 1 + gamma^2, the extra part is independent of eps.
    seen = implied_noise(noisy, clean, t)
    assert abs(seen.var().item() - (1 + gamma**2)) < 0.03
    assert abs(residual.std().item() - gamma) < 0.005
    assert abs(torch.corrcoef(torch.stack([residual.flatten(), noise.flatten()]))[0, 1].item()) < 0.02


def test_no_perturbation_is_plain_ddpm():
    noise, timesteps, perturbation = draw_step_noise(0, 1, 64, (3, 4, 4), 1000, 0.0)
    assert perturbation is None
    clean = torch.rand(64, 3, 4, 4)
    noisy, target = noisy_input_and_target(DDPMScheduler(), clean, noise, timesteps)
    for i in range(64):
        torch.testing.assert_close(
            implied_noise(noisy[i], clean[i], timesteps[i].item()), noise[i], rtol=1e-4, atol=1e-4
        )
    assert torch.equal(target, noise)


def test_perturbation_does_not_change_noise_or_timesteps():
    plain = draw_step_noise(5, 3, 32, (3, 4, 4), 1000, 0.0)
    perturbed = draw_step_noise(5, 3, 32, (3, 4, 4), 1000, 0.1)
    assert torch.equal(plain[0], perturbed[0]) and torch.equal(plain[1], perturbed[1])


def test_sample_prediction_target_is_clean_image():
    noise, timesteps, perturbation = draw_step_noise(0, 0, 8, (3, 4, 4), 1000, 0.1)
    clean = torch.rand(8, 3, 4, 4)
    _, target = noisy_input_and_target(DDPMScheduler(prediction_type="sample"), clean, noise, timesteps, perturbation)
    assert torch.equal(target, clean)
