"""UNet2DModel presets and the checks that a UNet can be trained at a given resolution."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_flat.errors import FlatError

# Each preset is a plain UNet2DModel config; `sample_size`, `in_channels` and `out_channels` come from the data.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1.1M parameters: makes recognisable 16x16 digits from the embedded dataset in minutes on a CPU.
    "tiny": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
        "attention_head_dim": None,
    },
    # The 35.7M-parameter DDPM CIFAR-10 network of Ho et al. 2020 (google/ddpm-cifar10-32 in diffusers).
    "ddpm-cifar10": {
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "attention_head_dim": None,
        "dropout": 0.1,
    },
    # ADM as guided-diffusion / DDPM-IP train it on CIFAR-10 (SPEC section 7): 128 channels x (1, 2, 2, 2), 3 residual
    # blocks per level, attention at 16x16 and 8x8 with 32 channels per head, scale-shift norm (FiLM by the timestep),
    # residual up/down-sampling, dropout 0.3. Learned variance is `build_unet(..., learn_sigma=True)`.
    "adm-cifar10": {
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 3,
        "down_block_types": [
            "ResnetDownsampleBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "ResnetDownsampleBlock2D",
        ],
        "up_block_types": ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "resnet_time_scale_shift": "scale_shift",
        "attention_head_dim": 32,
        "norm_num_groups": 32,
        "dropout": 0.3,
    },
    # ADM for LSUN Tower and FFHQ at 64x64: 192 channels x (1, 2, 3, 4), attention at 32, 16 and 8 with 64 channels per
    # head, dropout 0.1; otherwise as adm-cifar10.
    "adm-64": {
        "block_out_channels": [192, 384, 576, 768],
        "layers_per_block": 3,
        "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "resnet_time_scale_shift": "scale_shift",
        "attention_head_dim": 64,
        "norm_num_groups": 32,
        "dropout": 0.1,
    },
}


class ModelConfigError(FlatError):
    """A UNet config that cannot be used as asked."""


def load_unet_config(config: str) -> dict[str, Any]:
    """A UNet2DModel config from a preset name, a config JSON file, or a directory (model or pipeline) holding one."""
    if config in PRESETS:
        return dict(PRESETS[config])
    path = Path(config)
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as err:
                raise ModelConfigError(f"config: {candidate} is not valid JSON ({err})", "config") from None
    raise ModelConfigError(
        f"config: '{config}' is neither a preset ({', '.join(PRESETS)}) nor a UNet2DModel config file or directory",
        parameter="config",
    )


def build_unet(config: str, resolution: int, channels: int = 3, learn_sigma: bool = False) -> UNet2DModel:
    """A freshly initialised UNet2DModel for square `resolution`-pixel images with `channels` channels, unless the
    config (a preset name, a config file or a directory) sets `in_channels` itself (the images are then converted
    to that). With `learn_sigma` it outputs twice the channels: epsilon and the variance interpolation v."""
    settings = {k: v for k, v in load_unet_config(config).items() if not k.startswith("_")}
    settings["sample_size"] = resolution
    in_channels = settings.setdefault("in_channels", channels)
    out_channels = in_channels * (2 if learn_sigma else 1)
    if in_channels not in (1, 3) or settings.setdefault("out_channels", out_channels) != out_channels:
        raise ModelConfigError(
            f"config: in_channels must be 1 (grayscale) or 3 (RGB) and out_channels {out_channels} "
            f"({'twice in_channels: learned variance' if learn_sigma else 'equal to in_channels'}), "
            f"got {in_channels} and {settings['out_channels']}",
            "config",
        )
    try:
        unet = UNet2DModel.from_config(settings)
    except (ValueError, TypeError) as err:
        raise ModelConfigError(f"config: UNet2DModel rejects this config ({err})", "config") from None
    # Every down block but the last halves the image.
    factor = 2 ** (len(unet.config.down_block_types) - 1)
    if resolution < factor or resolution % factor:
        raise ModelConfigError(
            f"resolution {resolution} does not fit this UNet: its {len(unet.config.down_block_types)} down blocks "
            f"need a multiple of {factor}",
            parameter="resolution",
        )
    return unet


def make_noise_unconditional(unet: UNet2DModel) -> UNet2DModel:
    """Blind `unet` to the noise level (SPEC section 5, noise unconditioning), in place: the first layer of its time
    embedding gets zero weights, frozen, so the embedding is a learned constant (its biases still train) whatever the
    timestep, in training and when plain diffusers loads it.

    Example:
        >>> unet = make_noise_unconditional(build_unet("tiny", 16, 1))
        >>> x = torch.randn(1, 1, 16, 16)
        >>> torch.equal(unet(x, 10).sample, unet(x, 900).sample)
        True
    """
    layer = unet.time_embedding.linear_1
    with torch.no_grad():
        layer.weight.zero_()
    layer.weight.requires_grad_(False)  # the optimizers and SAM skip it: it stays zero
    return unet


def build_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    learn_sigma: bool = False,
    timestep_spacing: str = "linspace",
) -> DDPMScheduler:
    """The DDPM noise scheduler a run trains and samples with, saved in its pipeline so that plain diffusers samples
    the same way.

    Args:
        num_train_timesteps: T.
        beta_schedule: diffusers' beta schedule (the paper's ADM: squaredcos_cap_v2).
        prediction_type: what the UNet predicts (epsilon, sample, v_prediction).
        learn_sigma: a UNet that also outputs the variance interpolation v in [-1, 1].
        timestep_spacing: which timesteps respaced sampling keeps.

    Example:
        >>> build_scheduler(learn_sigma=True).config.variance_type
        'learned_range'
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        # A learned variance v in [-1, 1] interpolates log beta~_t and log beta_t, as the hybrid loss trains it.
        variance_type="learned_range" if learn_sigma else "fixed_small",
        # The paper's sampler (guided-diffusion's respacing) keeps round(k (T - 1) / (T' - 1)): 999, 946, ..., 0.
        timestep_spacing=timestep_spacing,
    )
