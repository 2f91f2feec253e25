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
def figure_samples(
    pipeline: str | os.PathLike,
    granularity: str,
    bits: int,
    num_samples: int = 16,
    steps: int = 50,
    seed: int = 0,
    sampler: str = "ddim",
) -> tuple[np.ndarray, np.ndarray]:
    """One row of the figure: a pipeline's 8-bit samples from `num_samples` noises of stream `seed` at fp32 and with
    `bits`-bit `granularity` weights, drawn by the pipeline `sampler` ("ddim": DDIMPipeline, eta = 0; "ddpm") in
    `steps` steps. Small (a few KB): a study keeps them, so that its picture does not need the weights again."""
    network = DDPMPipeline.from_pretrained(pipeline)
    unet = network.unet.eval()
    quantized = copy.deepcopy(unet)
    quantize_weights_(quantized, bits, granularity)
    fp32, moved = (
        sample_images(model, network.scheduler, num_samples, steps, seed, show_progress=False, sampler=sampler)
        for model in (unet, quantized)
    )
    return fp32, moved


def write_quantization_figure(
    rows: dict[str, tuple[np.ndarray, np.ndarray]],
    granularity: str,
    bits: int,
    path: str | os.PathLike,
    steps: int = 50,
    sampler: str = "ddim",
) -> dict[str, float]:
    """Write the figure of `rows` (label -> `figure_samples`' fp32 and quantized samples, e.g. {"ADM, seed 1": ...}),
    one row each, fp32 beside `bits`-bit `granularity`, to `path`. Returns each row's displacement (the mean absolute
    pixel change, 0-255, of the samples shown)."""
    panels, displacement = {}, {}
    for label, (fp32, moved) in rows.items():
        displacement[label] = float(np.abs(moved.astype(np.float64) - fp32).mean())
        panels[label] = (image_grid(fp32), image_grid(moved), displacement[label])
    plot_quantized_samples(panels, f"{bits}-bit {granularity}", f"{sampler.upper()}, {steps} steps", path)
    return displacement
