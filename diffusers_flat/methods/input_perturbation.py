"""The noisy training input and its regression target, with DDPM-IP input perturbation (Ning et al. 2023)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffusers_flat.errors import FlatError


def noisy_input_and_target(
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    perturbation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(x_t, target)` for one batch of the denoising loss.

    `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) (noise + perturbation)`, with DDPM-IP's `perturbation = gamma * xi`
    (drawn already scaled, see `training.draw_step_noise`) or None; the target ignores the perturbation: `noise` for
    epsilon-prediction, `clean` for sample-prediction, the velocity of `(clean, noise)` for v-prediction.
    """
    # DDPM-IP: the network sees eps + gamma * xi, the target stays eps.
    noisy = scheduler.add_noise(clean, noise if perturbation is None else noise + perturbation, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    else:
        raise FlatError(
            f"prediction_type {prediction_type!r} is unknown; use epsilon, sample or v_prediction",
            parameter="prediction_type",
        )
    return noisy, target
