"""How a model degrades as its weights lose bits: the quantization-sensitivity curve. At each (granularity, bits) of
a ladder, paired with the fp32 model, three measures that need no feature network:

- the increase of the fixed diffusion loss (the same (x0, t, eps) triples);
- the deterministic displacement: the mean absolute pixel change (0-255 scale, unrounded) of DDIM samples (eta = 0)
  from the same starting noises, the primary figure: the map from noise to image is continuous in the weights, so
  the displacement grows with the weight change;
- the ancestral displacement: the same for DDPM ancestral samples from the same noise stream. A tiny weight change
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
from diffusers_flat.metrics.pfd import flow_map
from diffusers_flat.quantization import check_bits, check_granularity, quantize_weights_
from diffusers_flat.utils.sampling import sample_images


class SensitivityPoint(TypedDict):
    loss_increase: float  # L(quantized w) - L(w)
    ddim_displacement: float  # mean |DDIM sample of quantized - of fp32|, 0-255 scale
    ancestral_displacement: float  # the same for DDPM ancestral samples


class SensitivityResult(TypedDict):
    curves: dict[str, dict[str, SensitivityPoint]]  # granularity -> bits -> the three measures
    num_samples: int
    steps: int


def ddim_images(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int,
    steps: int,
    seed: int = 0,
    batch_size: int = 250,
) -> torch.Tensor:
    """DDIM (eta = 0) samples from the first `num_samples` noises of the stream `seed`, clamped to [-1, 1] as a
    pipeline outputs them and scaled to 0-255, unrounded."""
    flows = flow_map(model, scheduler.config, num_samples, steps, "ddim", seed, batch_size, show_progress=False)
    return (flows.clamp(-1, 1).double() + 1) * 127.5


def ancestral_images(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int,
    steps: int,
    seed: int = 0,
    batch_size: int = 250,
) -> np.ndarray:
    """Respaced DDPM ancestral samples of the noise stream `seed` (`sample_images`), 0-255."""
    return sample_images(model, scheduler, num_samples, steps, seed, batch_size, show_progress=False).astype(
        np.float64
    )


def deterministic_displacement(
    a: torch.nn.Module,
    b: torch.nn.Module,
    scheduler: DDPMScheduler,
    num_samples: int = 64,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 250,
) -> float:
    """The mean absolute pixel difference (0-255 scale, unrounded) between the DDIM (eta = 0) samples of two models
    from the same starting noises, the images clamped to [-1, 1] as a pipeline outputs them.

    Example:
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"))
        >>> deterministic_displacement(unet, unet, DDPMScheduler(), num_samples=2, steps=4)
        0.0
    """
    a_images, b_images = (ddim_images(m, scheduler, num_samples, steps, seed, batch_size) for m in (a, b))
    return float((a_images - b_images).abs().mean())


def quantization_sensitivity(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    loss: DiffusionLoss,
    bits: tuple[int, ...] = (8, 6, 5, 4, 3),
    granularities: tuple[str, ...] = ("per_tensor", "per_channel"),
    num_samples: int = 64,
    steps: int = 20,
    seed: int = 0,
    batch_size: int = 250,
) -> SensitivityResult:
    """The sensitivity curve of `model`: each measure at each (granularity, bits), paired with fp32.

    Args:
        model: a UNet (left unchanged: each level quantizes a copy).
        scheduler: its DDPMScheduler.
        loss: the fixed diffusion loss.
        bits: the ladder, e.g. 8, 6, 5, 4, 3 (2-8 each).
        granularities: per_tensor and/or per_channel scales.
        num_samples: samples of each displacement.
        steps: DDIM steps (a divisor of the training timesteps) and respaced ancestral steps.
        seed: the noise stream of the samples.
        batch_size: images per UNet batch.
    """
    for b in bits:
        check_bits(b)
    for g in granularities:
        check_granularity(g)
    fp32_loss = loss(model)
    sampling = (scheduler, num_samples, steps, seed, batch_size)
    fp32_ddim, fp32_ancestral = ddim_images(model, *sampling), ancestral_images(model, *sampling)  # once, for all
    curves: dict[str, dict[str, SensitivityPoint]] = {}
    levels = [(g, b) for g in granularities for b in bits]
    for granularity, b in tqdm(levels, desc="Quantization ladder", leave=False):
        quantized = copy.deepcopy(model)
        quantize_weights_(quantized, b, granularity)
        curves.setdefault(granularity, {})[str(b)] = {
            "loss_increase": loss(quantized) - fp32_loss,
            "ddim_displacement": float((ddim_images(quantized, *sampling) - fp32_ddim).abs().mean()),
            "ancestral_displacement": float(np.abs(ancestral_images(quantized, *sampling) - fp32_ancestral).mean()),
        }
    return {"curves": curves, "num_samples": num_samples, "steps": steps}
