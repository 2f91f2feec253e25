"""Every way the package draws samples, in one place.

- The **pipeline samplers**, what a user gets: `ddpm` is `DDPMPipeline` (respaced ancestral sampling) and `ddim` is
  `DDIMPipeline` with eta = 0, each run on the model's own scheduler config (clipping, thresholding and timestep
  spacing as the model ships them). `pipeline_samples` calls the diffusers pipelines themselves, so its images are
  theirs, bit for bit, from the same generators. Everything that shows or measures samples uses these.
- The **probability-flow ODE** (`flow_map`): DDIM with eta = 0 but no clipping or thresholding and "trailing"
  spacing, the deterministic noise-to-data map that PFD measures. It is PFD's instrument, not a picture of what a
  user gets: on a weak model many of its samples end as saturated noise.

Image i of a stream `seed` draws all its noise (x_T and every step's) from a CPU generator of its own,
`sampling_generator(seed, i)`, moved to the UNet's device: the same image whatever the batch size, the device, or
the share of the indices a process generates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.utils.seeding import sampling_generator

SAMPLERS = ("ddim", "ddpm")  # the pipeline samplers: DDIMPipeline (eta = 0), DDPMPipeline
SOLVERS = ("ddim", "dpm-solver++")  # the PF-ODE's solvers


def check_sampler(sampler: str, unet_config: dict | None = None, parameter: str = "sampler") -> None:
    """`sampler` must be a pipeline sampler, and `ddim` needs a UNet (of config `unet_config`) that predicts the noise
    alone: DDIMPipeline cannot sample a learned-variance UNet. `parameter` names the argument that gave it."""
    if sampler not in SAMPLERS:
        raise FlatError(f"{parameter} must be one of {', '.join(SAMPLERS)}, got {sampler!r}", parameter)
    if sampler == "ddim" and unet_config and unet_config["out_channels"] != unet_config["in_channels"]:
        raise FlatError(
            f"{parameter} ddim: this UNet also predicts its variance ({unet_config['out_channels']} output channels), "
            "which DDIMPipeline cannot sample; use ddpm",
            parameter,
        )


def sampling_pipeline(unet: torch.nn.Module, scheduler, sampler: str = "ddpm") -> DDIMPipeline | DDPMPipeline:
    """The diffusers pipeline a user builds for `sampler` from `unet` and its scheduler's config: a fresh scheduler
    (set_timesteps mutates one, and callers may sample concurrently); DDIMPipeline turns the config into a
    DDIMScheduler's itself."""
    check_sampler(sampler, unet.config)
    if sampler == "ddim":
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config))


@torch.no_grad()
def pipeline_samples(
    unet: torch.nn.Module,
    scheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
    first_index: int = 0,
    sampler: str = "ddpm",
) -> np.ndarray:
    """Images `first_index`, ..., `first_index + num_images - 1` of the stream `seed`, as the `sampler` pipeline
    returns them with `output_type="np"`: float32 NHWC in [0, 1], neither rounded nor truncated.

    Args:
        unet: the UNet (its device is the pipeline's).
        scheduler: its scheduler; only the config is read.
        num_images: images to draw.
        num_inference_steps: the pipeline's steps.
        seed: the noise stream.
        batch_size: images per pipeline call.
        show_progress: the pipeline's progress bar.
        first_index: the first image's index in the stream.
        sampler: "ddpm" (DDPMPipeline) or "ddim" (DDIMPipeline, eta = 0).

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> blocks = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, **blocks)
        >>> pipeline_samples(unet, DDPMScheduler(), 2, 5, show_progress=False, sampler="ddim").shape
        (2, 8, 8, 1)
    """
    pipeline = sampling_pipeline(unet, scheduler, sampler)
    pipeline.set_progress_bar_config(disable=not show_progress, leave=False)
    was_training = unet.training
    unet.eval()
    size, channels = unet.config.sample_size, unet.config.in_channels
    batches = [np.zeros((0, size, size, channels), dtype=np.float32)]  # a process's share can be empty
    for start in range(first_index, first_index + num_images, batch_size):
        indices = range(start, min(start + batch_size, first_index + num_images))
        # a pipeline draws sample k of the batch from generators[k], for x_T and for every step's noise
        generators = [sampling_generator(seed, i) for i in indices]
        options = {"eta": 0.0} if sampler == "ddim" else {}
        output = pipeline(
            batch_size=len(indices),
            generator=generators,
            num_inference_steps=num_inference_steps,
            output_type="np",
            **options,
        )
        batches.append(output.images)
    unet.train(was_training)
    return np.concatenate(batches)


def sample_images(
    unet: torch.nn.Module,
    scheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 64,
    show_progress: bool = True,
    first_index: int = 0,
    sampler: str = "ddpm",
) -> np.ndarray:
    """`pipeline_samples` as uint8 NHWC images (`to_uint8`): what FID, KID, memorization and the pictures read."""
    pixels = pipeline_samples(
        unet, scheduler, num_images, num_inference_steps, seed, batch_size, show_progress, first_index, sampler
    )
    return to_uint8(torch.from_numpy(pixels) * 255).numpy()


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


# The probability-flow ODE: PFD's instrument, not a user's sampler.


def ode_solver(scheduler_config: dict, solver: str = "ddim"):
    """A deterministic solver of the PF-ODE on the noise schedule of `scheduler_config` (a DDPMScheduler's config):
    no clipping or thresholding of the x0 prediction, which would leave the ODE."""
    if solver not in SOLVERS:
        raise FlatError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}", "solver")
    if solver == "ddim":  # eta = 0 in step(): deterministic
        # DDIM steps from t to t - T // steps whatever the spacing; "trailing" (999, 979, ..., 19 for 50 of 1000
        # steps) is the spacing whose next timestep is that one, starting from the noisiest
        return DDIMScheduler.from_config(
            scheduler_config, clip_sample=False, thresholding=False, timestep_spacing="trailing"
        )
    # the model's variance output, if any, is cut off before the solver sees it (flow_map)
    return DPMSolverMultistepScheduler.from_config(
        scheduler_config, algorithm_type="dpmsolver++", solver_order=2, thresholding=False, variance_type=None
    )


def check_steps(steps: int, solver: str, train_steps: int, parameter: str = "steps") -> None:
    """The PF-ODE solver's steps: at least one, and for DDIM a divisor of the training timesteps (its fixed stride);
    `parameter` names the argument that gave them."""
    if steps < 1 or (solver == "ddim" and train_steps % steps):
        raise FlatError(
            f"{parameter} must divide the {train_steps} training timesteps for ddim (its stride is {train_steps} // "
            f"steps), got {steps}; or use dpm-solver++",
            parameter,
        )


def starting_noise(shape: tuple[int, ...], first: int, count: int, seed: int) -> torch.Tensor:
    """The noises z of indices first, ..., first + count - 1: each from a generator of its own seeded from (seed, i),
    as the pipeline samplers draw x_T, so every model and batch size sees the same z."""
    return torch.cat(
        [torch.randn((1, *shape), generator=sampling_generator(seed, i)) for i in range(first, first + count)]
    )


@torch.no_grad()
def flow_map(
    model: torch.nn.Module,
    scheduler_config: dict,
    num_noises: int,
    steps: int = 50,
    solver: str = "ddim",
    seed: int = 0,
    batch_size: int = 250,
    show_progress: bool = True,
) -> torch.Tensor:
    """Phi(z), the PF-ODE's end from the first `num_noises` noises of the stream `seed`: (N, C, H, W) float32 on the
    CPU, in the model's units ([-1, 1] for images), neither clamped nor rounded."""
    check_steps(steps, solver, scheduler_config["num_train_timesteps"])
    channels, size = model.config.in_channels, model.config.sample_size
    device = next(iter([*model.parameters(), *model.buffers()])).device
    was_training = model.training
    model.eval()
    outputs = []
    for first in tqdm(range(0, num_noises, batch_size), desc="PF-ODE", disable=not show_progress, leave=False):
        scheduler = ode_solver(scheduler_config, solver)  # multistep solvers keep state: a fresh one per batch
        scheduler.set_timesteps(steps)
        x = starting_noise((channels, size, size), first, min(batch_size, num_noises - first), seed).to(device)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = model(x, t).sample[:, :channels]  # a learned-variance model's v is not part of the ODE
            x = scheduler.step(eps, t, x).prev_sample
        outputs.append(x.float().cpu())
    model.train(was_training)
    return torch.cat(outputs)
