"""The answer in one picture, of the paper's Figure 2 kind: a base model's and a flat model's samples from the same
noises at fp32 and at the ladder level where the study found the largest gap between them, side by side, with the
pixel displacement under each quantized panel. Made from a study's own models, with the pipeline sampler a user
calls (`DDIMPipeline`, eta = 0, by default)."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from diffusers import DDPMPipeline

from diffusers_flat.evaluation.plots import plot_quantized_samples
from diffusers_flat.quantization import quantize_weights_
from diffusers_flat.sampling import image_grid, sample_images
from diffusers_flat.studies.claims import ladder_point, paired_interval


def largest_gap(results: dict[str, dict[int, dict]], comparisons: list[tuple[str, str]]) -> tuple[str, str, str, str]:
    """The (base, treated, granularity, bits) whose mean paired displacement base - treated is the largest over
    every comparison and ladder level: where the flat model holds up best against the base. The displacement of the
    pipeline sampler, or in results made before there was one, the PF-ODE's."""
    best, best_gap = None, -np.inf
    for base, treated in comparisons:
        seeds = sorted(set(results.get(base, {})) & set(results.get(treated, {})))
        if not seeds or "sensitivity" not in results[base][seeds[0]]:
            continue
        for granularity, levels in results[base][seeds[0]]["sensitivity"]["curves"].items():
            for bits in levels:
                measure = "displacement" if "displacement" in levels[bits] else "ddim_displacement"
                point = ladder_point(granularity, bits, measure)
                gap = -paired_interval(
                    [point(results[base][s]) for s in seeds], [point(results[treated][s]) for s in seeds]
                )["mean"]
                if gap > best_gap:
                    best, best_gap = (base, treated, granularity, bits), gap
    if best is None:
        raise ValueError("no comparison has quantization-sensitivity results")
    return best


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
