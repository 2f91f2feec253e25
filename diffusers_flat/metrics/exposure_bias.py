"""Exposure bias (Ning et al. 2023): the predicted noise's norm on ground-truth noisy inputs versus along the model's
own sampling chain, at every respaced timestep."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.methods.learned_variance import predicted_mean_part


class ExposureBiasResult(TypedDict):
    timesteps: list[int]
    training_norm: list[float]  # mean ||eps_theta(x_t, t)|| on q_sample(x0, t), per respaced step
    sampling_norm: list[float]  # the same along the model's own chain
    gap: list[float]  # sampling - training, per step
    squared_norm_gap: float  # mean over steps of E||eps||^2 (sampling) - E||eps||^2 (training): Table 1's figure
    summed_gap: float  # the sum of `gap`


@torch.no_grad()
def exposure_bias(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    real_images: torch.Tensor,
    num_inference_steps: int,
    seed: int = 0,
    chain: str = "model",
    batch_size: int = 256,
    show_progress: bool = True,
) -> ExposureBiasResult:
    """Mean ||eps_theta(x_t, t)|| per respaced timestep, with x_t = q_sample(real x0, t) ("training") and with x_t
    from DDPM sampling started at N(0, I) ("sampling"), one chain per real image.

    `chain="ground_truth"` feeds the "sampling" curve q_sample of the same images with fresh noise instead of the
    chain, which must give the training curve back up to sampling error (a check of the measurement itself).
    Returns both curves, their per-step gap, the mean gap of the squared norms (the paper's Table 1 figure) and the
    summed gap of the norms.
    """
    if chain not in ("model", "ground_truth"):
        raise FlatError(f"chain must be 'model' or 'ground_truth', got {chain!r}", parameter="chain")
    if scheduler.config.prediction_type != "epsilon":
        raise FlatError(
            f"scheduler: exposure bias needs an epsilon-prediction model, not {scheduler.config.prediction_type}",
            parameter="scheduler",
        )
    scheduler = DDPMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    unet = unet.eval()
    device = next(unet.parameters()).device
    # Noise is drawn on the CPU from `seed` and moved (the scheduler's step does the same with a CPU generator): the
    # same numbers on every device.
    generator = torch.Generator().manual_seed(seed)
    real_images = real_images.to(device)
    noise = torch.randn(real_images.shape, generator=generator).to(device)
    x = torch.randn(real_images.shape, generator=generator).to(device)
    timesteps = [int(t) for t in scheduler.timesteps]
    curves = {"training_norm": [], "sampling_norm": [], "training_sq": [], "sampling_sq": []}

    def predict(inputs: torch.Tensor, t: int) -> torch.Tensor:
        return torch.cat([unet(inputs[i : i + batch_size], t).sample for i in range(0, len(inputs), batch_size)])

    for t in tqdm(timesteps, desc="Exposure bias", disable=not show_progress, leave=False):
        t_batch = torch.full((len(real_images),), t, device=device)
        noisy = scheduler.add_noise(real_images, noise, t_batch)
        truth = predicted_mean_part(predict(noisy, t), noisy).flatten(1).norm(dim=1)
        if chain == "ground_truth":
            fresh = torch.randn(real_images.shape, generator=generator).to(device)
            x = scheduler.add_noise(real_images, fresh, t_batch)
        output = predict(x, t)  # a learned-variance model's output carries v too, which the scheduler's step reads
        on_chain = predicted_mean_part(output, x).flatten(1).norm(dim=1)
        if chain == "model":
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        for name, values in (("training", truth), ("sampling", on_chain)):
            curves[f"{name}_norm"].append(values.mean().item())
            curves[f"{name}_sq"].append((values**2).mean().item())
    gap = np.asarray(curves["sampling_norm"]) - np.asarray(curves["training_norm"])
    return {
        "timesteps": timesteps,
        "training_norm": curves["training_norm"],
        "sampling_norm": curves["sampling_norm"],
        "gap": gap.tolist(),
        "squared_norm_gap": float(np.mean(np.asarray(curves["sampling_sq"]) - np.asarray(curves["training_sq"]))),
        "summed_gap": float(gap.sum()),
    }
