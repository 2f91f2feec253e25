"""The noisy training input and its regression target, with DDPM-IP input perturbation (Ning et al. 2023)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def noisy_input_and_target(
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    input_perturbation: float = 0.0,
    xi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(x_t, target)` for one batch of the denoising loss.

    `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) (noise + input_perturbation * xi)`; the target ignores the
    perturbation: `noise` for epsilon-prediction, `clean` for sample-prediction, the velocity of `(clean, noise)` for
    v-prediction.
    """
    if input_perturbation:
        if xi is None:
            raise ValueError("input_perturbation > 0 needs the extra Gaussian noise `xi`")
        noisy = scheduler.add_noise(clean, noise + input_perturbation * xi, timesteps)
    else:
        noisy = scheduler.add_noise(clean, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use epsilon, sample or v_prediction")
    return noisy, target
