"""The pipeline samplers against the diffusers pipelines and a hand-written DDIM, sample grids, and the timesteps
trained pipelines sample at."""

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler
from helpers import micro_unet

from diffusers_flat.errors import FlatError
from diffusers_flat.sampling import check_sampler, flow_map, image_grid, pipeline_samples, sample_images
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


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A small trained-looking UNet saved as a plain DDPMPipeline with a shipped-style scheduler config (clipping on,
    linspace spacing), as users download them."""
    torch.manual_seed(0)
    unet = micro_unet()
    with torch.no_grad():  # away from the initialisation, whose output layer is zero
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace", clip_sample=True)
    path = tmp_path_factory.mktemp("pipeline")
    DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(path)
    return path


def user_images(pipeline_class, path, count: int, steps: int, seed: int, **options) -> np.ndarray:
    """What a user gets: the pipeline loaded from the directory, called once with a generator per image."""
    pipeline = pipeline_class.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    generators = [sampling_generator(seed, i) for i in range(count)]
    return pipeline(
        batch_size=count, generator=generators, num_inference_steps=steps, **{"output_type": "np"} | options
    )


@pytest.mark.parametrize(
    ("sampler", "pipeline_class", "options"), [("ddim", DDIMPipeline, {"eta": 0.0}), ("ddpm", DDPMPipeline, {})]
)
def test_pipeline_samplers_are_bit_equal_to_the_diffusers_pipelines(saved_pipeline, sampler, pipeline_class, options):
    loaded = DDPMPipeline.from_pretrained(saved_pipeline)
    ours = pipeline_samples(
        loaded.unet, loaded.scheduler, 5, 10, seed=3, batch_size=5, show_progress=False, sampler=sampler
    )
    theirs = user_images(pipeline_class, saved_pipeline, 5, 10, 3, **options)
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs.images)
    # the 8-bit images: ours truncate (guided-diffusion's convention), the user's PIL images round; both from the
    # same floats
    uint8 = sample_images(
        loaded.unet, loaded.scheduler, 5, 10, seed=3, batch_size=5, show_progress=False, sampler=sampler
    )
    assert np.array_equal(uint8, np.floor(theirs.images * 255).astype(np.uint8))
    pil = user_images(pipeline_class, saved_pipeline, 5, 10, 3, **options | {"output_type": "pil"}).images
    rounded = np.stack([np.asarray(image) for image in pil]).reshape(ours.shape)
    assert np.array_equal(rounded, np.round(ours * 255).astype(np.uint8))
    # another batch split and a later first index draw the same images, to float rounding
    split = pipeline_samples(
        loaded.unet, loaded.scheduler, 3, 10, seed=3, batch_size=2, show_progress=False, first_index=2, sampler=sampler
    )
    np.testing.assert_allclose(split, ours[2:], atol=1e-4)  # a tenth of a gray level


def ddim_with_clipping_by_hand(unet, abar: torch.Tensor, count: int, steps: int, seed: int) -> np.ndarray:
    """DDIM (eta = 0) as the shipped config asks for it, written out: timesteps linspace(0, 999, steps) rounded,
    from the noisiest; x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) clamped to [-1, 1]; the previous timestep
    t - 1000 // steps (diffusers' DDIM stride whatever the spacing), abar = 1 below 0; x_prev = sqrt(abar_prev) x0
    + sqrt(1 - abar_prev) eps; the image (x / 2 + 0.5) clamped to [0, 1]."""
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.cat([torch.randn(shape, generator=sampling_generator(seed, i)) for i in range(count)]).double()
    timesteps = np.linspace(0, 999, steps).round()[::-1].astype(int)
    with torch.no_grad():
        for t in timesteps:
            eps = unet(x.float(), int(t)).sample.double()
            x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
            prev = t - 1000 // steps
            a_prev = abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_the_ddim_sampler_clips_as_the_shipped_config_asks_unlike_the_pf_ode(saved_pipeline):
    loaded = DDPMPipeline.from_pretrained(saved_pipeline)
    ours = pipeline_samples(loaded.unet, loaded.scheduler, 4, 20, seed=1, show_progress=False, sampler="ddim")
    by_hand = ddim_with_clipping_by_hand(loaded.unet, loaded.scheduler.alphas_cumprod.double(), 4, 20, 1)
    np.testing.assert_allclose(ours, by_hand, atol=3e-3)  # float32 against float64 over 20 steps; no clip: 1.0
    ode = flow_map(loaded.unet, loaded.scheduler.config, 4, 20, seed=1, show_progress=False)
    ode = (ode.clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(ode - ours).max() > 1e-2  # no clipping, trailing spacing: another map


def test_samplers_are_checked_by_name_and_ddim_refuses_a_learned_variance_unet():
    with pytest.raises(FlatError, match="sampler must be one of ddim, ddpm, got 'euler'"):
        check_sampler("euler")
    config = {"in_channels": 3, "out_channels": 6}
    with pytest.raises(FlatError, match="ladder_sampler ddim: this UNet also predicts its variance"):
        check_sampler("ddim", config, "ladder_sampler")
    check_sampler("ddpm", config)  # DDPMPipeline samples it
