"""Sampling images from a DDPM UNet with respaced ancestral sampling, and laying them out as a grid."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import make_image_grid
from PIL import Image


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
) -> np.ndarray:
    """`num_images` DDPM samples as uint8 NHWC, drawn with `num_inference_steps` respaced ancestral steps."""
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=not show_progress, leave=False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = unet.training
    unet.eval()
    batches = []
    for start in range(0, num_images, batch_size):
        output = pipeline(
            batch_size=min(batch_size, num_images - start),
            generator=generator,
            num_inference_steps=num_inference_steps,
            output_type="np",
        )
        batches.append(np.round(output.images * 255).astype(np.uint8))
    unet.train(was_training)
    return np.concatenate(batches)


def image_grid(images: np.ndarray) -> Image.Image:
    """A near-square grid of uint8 NHWC images (grayscale when they have one channel)."""
    pictures = [Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image) for image in images]
    cols = math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    pictures += [Image.new(pictures[0].mode, pictures[0].size)] * (rows * cols - len(pictures))
    return make_image_grid(pictures, rows=rows, cols=cols)
