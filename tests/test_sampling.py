"""Sample grids, and the timesteps trained pipelines sample at."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from helpers import micro_unet

from diffusers_flat.utils.sampling import image_grid, sample_images
from diffusers_flat.utils.seeding import sampling_generator


def test_grid_places_each_image_enlarged_with_padding():
    images = np.stack([np.full((8, 8, 1), 10 * i, dtype=np.uint8) for i in range(5)])
    grid = np.asarray(image_grid(images, min_cell=16, padding=2))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2)  # 3 columns, 2 rows of 16-pixel cells
    for i in range(5):
        top, left = 2 + (i // 3) * 18, 2 + (i % 3) * 18
        assert (grid[top : top + 16, left : left + 16] == 10 * i).all()
    assert (grid[2 + 18 : 2 + 18 + 16, 2 + 2 * 18 :][:, :16] == 128).all()  # the empty sixth cell
    assert (grid[0, :] == 128).all() and (grid[:, 1] == 128).all()


def test_rgb_grid_stays_rgb():
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    assert image_grid(images).mode == "RGB" and image_grid(images).size == (2 * 64 + 6, 2 * 64 + 6)


def guided_diffusion_respacing(num_timesteps: int, count: int) -> list[int]:
    """guided-diffusion's `space_timesteps(T, [count])`, written out here: walk from 0 to T - 1 in `count` equal float
    strides and keep the rounded positions."""
    stride, position, kept = (num_timesteps - 1) / (count - 1), 0.0, []
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


@pytest.mark.parametrize("count", [20, 100])
def test_trained_pipelines_sample_the_paper_s_timesteps_in_plain_diffusers(two_models, count):
    scheduler = DDPMScheduler.from_pretrained(two_models[0], subfolder="scheduler")
    assert scheduler.config.timestep_spacing == "linspace"
    scheduler.set_timesteps(count)
    expected = sorted(guided_diffusion_respacing(1000, count), reverse=True)
    assert scheduler.timesteps.tolist() == expected
    assert expected[:3] == ([999, 946, 894] if count == 20 else [999, 989, 979])


def test_samples_become_8_bit_images_as_guided_diffusion_truncates_them():
    unet = micro_unet().eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    ours = sample_images(unet, scheduler, 3, 4, seed=5, batch_size=3, show_progress=False)

    # The reverse chain written out per image, with its own noise stream, and guided-diffusion's sample_fn output
    # conversion: ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).
    scheduler.set_timesteps(4)
    reference, rounded = [], []
    with torch.no_grad():
        for i in range(3):
            generator = sampling_generator(5, i)
            x = torch.randn((1, 3, 8, 8), generator=generator)
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
            reference.append(((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
            rounded.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    reference, rounded = np.stack(reference), np.stack(rounded)

    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    differs = np.abs(ours.astype(int) - reference.astype(int))
    assert differs.max() <= 1 and (differs == 0).mean() > 0.99  # equal but for float32 ulps at integer boundaries
    assert (rounded != reference).mean() > 0.2  # rounding would be told apart
