"""How a model degrades as its weights lose bits: the quantization-sensitivity curve. At each (granularity, bits) of
a ladder, paired with the fp32 model, four measures that need no feature network:

- the increase of the fixed diffusion loss (the same (x0, t, eps) triples);
- the displacement, the primary figure: the mean absolute pixel change (0-255 scale, unrounded) of the samples a user
  gets, from a pipeline sampler (`DDIMPipeline` with eta = 0 by default, the model's own scheduler config) and the
  same noises. DDIM is deterministic, so a sample moves only as far as the weights move it;
- `ddim_displacement`: the same for the probability-flow ODE (`sampling.flow_map`: DDIM without clipping,
  "trailing" spacing), what reports before the pipeline samplers measured, kept so that they stay comparable. On a
  weak model the ODE's samples can be saturated noise: it is not what a user sees;
- the ancestral displacement: the same for `DDPMPipeline` samples from the same noise stream. A tiny weight change
  can send an ancestral chain to another mode, so this one need not grow as bits fall; it is reported beside.

The weights are quantized by `quantize_weights_`: per tensor on our symmetric absmax grid (codes +-(2^(b-1) - 1)), per
output channel on torchao's (codes -2^(b-1) .. 2^(b-1) - 1).
"""

from __future__ import annotations

import copy
from typing import TypedDict

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from diffusers_flat.metrics.flatness import DiffusionLoss
from diffusers_flat.quantization import check_bits, check_granularity, quantize_weights_
from diffusers_flat.sampling import check_sampler, flow_map, pipeline_samples


class SensitivityPoint(TypedDict):
    loss_increase: float  # L(quantized w) - L(w)
    displacement: float  # mean |pipeline sample of quantized - of fp32|, 0-255 scale: what a user sees
    ddim_displacement: float  # the same for the PF-ODE's samples (PFD's instrument)
    ancestral_displacement: float  # the same for DDPMPipeline samples


class SensitivityResult(TypedDict):
    curves: dict[str, dict[str, SensitivityPoint]]  # granularity -> bits -> the measures
    num_samples: int
    steps: int
    sampler: str  # the pipeline sampler of `displacement`: ddim or ddpm


def user_pixels(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int,
    steps: int,
    sampler: str,
    seed: int = 0,
    batch_size: int = 250,
) -> np.ndarray:
    """The `sampler` pipeline's samples from the first `num_samples` noises of the stream `seed`, 0-255, unrounded."""
    pixels = pipeline_samples(model, scheduler, num_samples, steps, seed, batch_size, False, sampler=sampler)
    return pixels.astype(np.float64) * 255


def ode_pixels(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int,
    steps: int,
    seed: int = 0,
    batch_size: int = 250,
) -> np.ndarray:
    """The PF-ODE's ends from the same noises, clamped to [-1, 1] and scaled to 0-255, unrounded (NHWC)."""
    flows = flow_map(model, scheduler.config, num_samples, steps, "ddim", seed, batch_size, show_progress=False)
    return ((flows.clamp(-1, 1).double() + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def displacement(
    a: torch.nn.Module,
    b: torch.nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int = 64,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 250,
) -> float:
    """The mean absolute pixel difference (0-255 scale, unrounded) between two models' samples from the `sampler`
    pipeline and the same noises.

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> displacement(unet, unet, DDPMScheduler(), num_samples=2, steps=4)
        0.0
    """
    a_images, b_images = (user_pixels(m, scheduler, num_samples, steps, sampler, seed, batch_size) for m in (a, b))
    return float(np.abs(a_images - b_images).mean())


def quantization_sensitivity(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    loss: DiffusionLoss,
    bits: tuple[int, ...] = (8, 6, 5, 4, 3),
    granularities: tuple[str, ...] = ("per_tensor", "per_channel"),
    num_samples: int = 64,
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 250,
    sampler: str = "ddim",
) -> SensitivityResult:
    """The sensitivity curve of `model`: each measure at each (granularity, bits), paired with fp32.

    Args:
        model: a UNet (left unchanged: each level quantizes a copy).
        scheduler: its DDPMScheduler.
        loss: the fixed diffusion loss.
        bits: the ladder, e.g. 8, 6, 5, 4, 3 (2-8 each).
        granularities: per_tensor and/or per_channel scales.
        num_samples: samples of each displacement.
        steps: the samplers' steps (for the PF-ODE a divisor of the training timesteps).
        seed: the noise stream of the samples.
        batch_size: images per UNet batch.
        sampler: the pipeline sampler of the primary displacement: "ddim" (DDIMPipeline, eta = 0) or "ddpm".
    """
    for b in bits:
        check_bits(b)
    for g in granularities:
        check_granularity(g)
    check_sampler(sampler, model.config)

    def samples(network: torch.nn.Module) -> dict[str, np.ndarray]:
        drawn = {
            "ddim_displacement": ode_pixels(network, scheduler, num_samples, steps, seed, batch_size),
            "ancestral_displacement": user_pixels(network, scheduler, num_samples, steps, "ddpm", seed, batch_size),
        }
        # with sampler ddpm the user's samples are the ancestral ones: drawn once
        drawn["displacement"] = (
            drawn["ancestral_displacement"]
            if sampler == "ddpm"
            else user_pixels(network, scheduler, num_samples, steps, sampler, seed, batch_size)
        )
        return drawn

    fp32_loss, fp32 = loss(model), samples(model)  # once, for every level
    curves: dict[str, dict[str, SensitivityPoint]] = {}
    levels = [(g, b) for g in granularities for b in bits]
    for granularity, b in tqdm(levels, desc="Quantization ladder", leave=False):
        quantized = copy.deepcopy(model)
        quantize_weights_(quantized, b, granularity)
        moved = {name: float(np.abs(images - fp32[name]).mean()) for name, images in samples(quantized).items()}
        curves.setdefault(granularity, {})[str(b)] = {"loss_increase": loss(quantized) - fp32_loss, **moved}
    return {"curves": curves, "num_samples": num_samples, "steps": steps, "sampler": sampler}
