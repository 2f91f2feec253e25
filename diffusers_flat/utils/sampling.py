"""Sampling images from a DDPM UNet with respaced ancestral sampling, and laying them out as a grid."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffusers_flat.utils.seeding import sampling_generator


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
    first_index: int = 0,
) -> np.ndarray:
    """`num_images` DDPM samples as uint8 NHWC (`to_uint8`), drawn with `num_inference_steps` respaced ancestral
    steps: the images numbered `first_index`, ..., `first_index + num_images - 1` of the stream that `seed` defines.

    Image i draws all its noise from a CPU generator of its own, seeded from (seed, i), and the noise is moved to the
    UNet's device: the same image whatever the batch size, the device, or the share of the indices a process
    generates (multi-process evaluation splits the indices).
    """
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=not show_progress, leave=False)
    was_training = unet.training
    unet.eval()
    size, channels = unet.config.sample_size, unet.config.in_channels
    batches = [np.zeros((0, size, size, channels), dtype=np.uint8)]  # a process's share can be empty
    for start in range(first_index, first_index + num_images, batch_size):
        indices = range(start, min(start + batch_size, first_index + num_images))
        # diffusers draws sample k of the batch from generators[k], for x_T and for every step's noise
        generators = [sampling_generator(seed, i) for i in indices]
        output = pipeline(
            batch_size=len(indices), generator=generators, num_inference_steps=num_inference_steps, output_type="pt"
        )
        batches.append(to_uint8(output.images * 255).permute(0, 2, 3, 1).cpu().numpy())  # images: x / 2 + 0.5
    unet.train(was_training)
    return np.concatenate(batches)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit images from pixel values on the 0-255 scale, truncated as guided-diffusion does it
    (`((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)`, a floor), not rounded: every sample that becomes an image (FID,
    KID, memorization, PFD's Inception features, the pictures) follows the convention of the tables we compare with.

    Example:
        >>> to_uint8(torch.tensor([-3.0, 0.4, 0.6, 254.9, 300.0])).tolist()
        [0, 0, 0, 254, 255]
    """
    return pixels.clamp(0, 255).to(torch.uint8)


def image_grid(images: np.ndarray, min_cell: int = 64, padding: int = 2) -> Image.Image:
    """A near-square grid of uint8 NHWC images on a gray background, each enlarged (nearest neighbour) to at least
    `min_cell` pixels so that small samples can be looked at."""
    scale = max(1, -(-min_cell // images.shape[1]))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        canvas[top : top + h, left : left + w] = image
    return Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
