"""A study's picture, of the paper's Figure 2 kind: models' samples from the same noises at fp32 and at one quantized
level, side by side, with the pixel displacement under each quantized panel. Made from a study's own models at the
level its file names, with the pipeline sampler a user calls (`DDIMPipeline`, eta = 0, by default)."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from diffusers import DDPMPipeline

from diffusers_flat.evaluation.plots import plot_quantized_samples
from diffusers_flat.quantization import quantize_weights_
from diffusers_flat.sampling import image_grid, sample_images


@torch.no_grad()
def write_quantization_figure(
    pipelines: dict[str, str | os.PathLike],
    granularity: str,
    bits: int,
    path: str | os.PathLike,
    num_samples: int = 16,
    steps: int = 50,
    seed: int = 0,
    sampler: str = "ddim",
) -> dict[str, float]:
    """Draw each pipeline's samples from the same `num_samples` noises at fp32 and with `bits`-bit `granularity`
    weights, one row per pipeline, and write the figure to `path`. Returns each row's displacement (the mean absolute
    pixel change, 0-255, of the 8-bit samples shown).

    Args:
        pipelines: row label -> DDPMPipeline directory, e.g. {"ADM": "runs/adm-seed1", "+SAM": "runs/sam-seed1"}.
        granularity: per_tensor or per_channel.
        bits: the quantized panel's bits.
        path: the PNG written.
        num_samples: samples per panel.
        steps: the sampler's steps.
        seed: the noise stream, the same for every panel.
        sampler: the pipeline sampler: "ddim" (DDIMPipeline, eta = 0) or "ddpm" (DDPMPipeline).
    """
    panels, displacement = {}, {}
    for label, directory in pipelines.items():
        pipeline = DDPMPipeline.from_pretrained(directory)
        unet = pipeline.unet.eval()
        quantized = copy.deepcopy(unet)
        quantize_weights_(quantized, bits, granularity)
        fp32, moved = (
            sample_images(network, pipeline.scheduler, num_samples, steps, seed, show_progress=False, sampler=sampler)
            for network in (unet, quantized)
        )
        displacement[label] = float(np.abs(moved.astype(np.float64) - fp32).mean())
        panels[label] = (image_grid(fp32), image_grid(moved), displacement[label])
    plot_quantized_samples(panels, f"{bits}-bit {granularity}", f"{sampler.upper()}, {steps} steps", path)
    return displacement
