"""What several test modules share that is not a fixture: stand-ins, hand computations and study files."""

import json

import numpy as np
import torch
from diffusers import UNet2DModel

from diffusers_flat.training.step import MicroBatch, draw_step_noise

# A UNet small enough for a training step in a few milliseconds: two levels, 8x8 images.
MICRO_UNET = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": None,
}


class PooledPixels(torch.nn.Module):
    """A stand-in for InceptionV3: each 8x8 image average-pooled to 2x2, 4 features."""

    num_features = 4

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images.double(), 4).flatten(1)


def unbiased_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """KID's estimate, written out: the unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = len(x), len(y)
    within = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2 * kxy.mean())


def tuning(**changes) -> dict:
    """The micro study's tuning of rho (0.1 or 0.01, seed 0, lowest KID at T'=2 of the raw pipeline)."""
    return {
        "method": "SAM",
        "flag": "--sam_rho",
        "values": ["0.1", "0.01"],
        "seed": 0,
        "select": {"metric": "kid", "inference_steps": 2, "variant": "raw"},
        "evaluation": ["--metrics", "fid", "--inference_steps", "2", "--num_samples", "100", "--num_real", "100"],
    } | changes


def write_study(path, **overrides):
    study = {
        "seeds": [1, 2],
        "methods": {"ADM": [], "SAM": []},
        "training": ["--model_config_name_or_path", str(path.parent / "micro.json"), "--resolution", "8"]
        + ["--max_train_steps", "3", "--train_batch_size", "8", "--eval_batch_size", "2"]
        + ["--ddpm_num_inference_steps", "2", "--swa_start", "1", "--swa_cycle", "1", "--lr_warmup_steps", "0"],
        "evaluation": ["--metrics", "lpf", "perturbation", "exposure_bias", "--inference_steps", "2", "4"]
        + ["--lpf_draws", "3", "--loss_samples", "16", "--gammas", "0", "5", "10", "--directions", "1"]
        + ["--exposure_samples", "4"],
        "tuning": tuning(),
    }
    study.update(overrides)
    (path.parent / "micro.json").write_text(json.dumps(MICRO_UNET))
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


def micro_unet() -> UNet2DModel:
    """The micro UNet for 3-channel 8x8 images, initialised from seed 0."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **MICRO_UNET)


def fixed_batch(input_perturbation: float = 0.0) -> MicroBatch:
    """One micro-batch of 6 fixed random images with a step's noise and timesteps (and IP's perturbation)."""
    noise, timesteps, perturbation = draw_step_noise(3, 0, 6, (3, 8, 8), 1000, input_perturbation)
    clean = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return MicroBatch(clean, noise, timesteps, perturbation)
