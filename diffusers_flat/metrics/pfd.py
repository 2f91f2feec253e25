"""The probability flow distance (arXiv 2505.20123; SPEC section 5): how far apart two denoisers send the same noise.

    PFD(p, q) = sqrt(E_z ||Psi(Phi_p(z)) - Psi(Phi_q(z))||^2)

Phi is a model's deterministic noise-to-data map, its probability-flow ODE integrated from the starting noise z by a
diffusers solver (DDIM with eta = 0, or DPM-Solver++, the faster). Psi is the identity on L2-normalised pixels (each
image scaled to unit norm, as the PFD paper's practice: distances that do not grow with the resolution), the identity
on the raw pixels (where the closed forms of Gaussian data hold), or InceptionV3's features. Phi's images are clamped
to the data range [-1, 1], as a pipeline outputs them (a model's own PF-ODE can leave it: `outside` says by how
much). PFD is a metric: zero for a model against itself, symmetric, and the triangle inequality holds (a Minkowski
inequality over the shared z). Teacher-student protocol: E_gen = PFD(student, teacher), E_mem = PFD(student, the
empirical denoiser of the student's training set).
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.fid import InceptionFeatures
from diffusers_flat.sampling import flow_map, to_uint8

DESCRIPTORS = ("pixels", "identity", "inception")


class PFDResult(TypedDict):
    pfd: float
    stderr: float  # the standard error over the noises z (delta method on the mean squared distance)
    num_noises: int
    steps: int
    solver: str
    descriptor: str
    # for p and q: sqrt(E_z ||Phi(z) - clamp(Phi(z))||^2), how far the flows end outside [-1, 1], in PFD's units
    outside: list[float]
    clamped: bool


def pixels_or_features(images: torch.Tensor, descriptor: str, inception: InceptionFeatures | None) -> torch.Tensor:
    """Psi: the flattened pixels scaled to unit L2 norm ("pixels"), as they are ("identity"), or InceptionV3's
    features of the images as 8-bit pictures."""
    flat = images.flatten(1).double()
    if descriptor == "pixels":
        return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)  # x / ||x||; an all-zero image stays 0
    if descriptor == "identity":
        return flat
    as_uint8 = to_uint8((images + 1) * 127.5)
    device = next(iter([*inception.parameters(), *inception.buffers()]), as_uint8).device
    return inception(as_uint8.to(device)).double().cpu()


def pfd(
    p: torch.nn.Module,
    q: torch.nn.Module,
    scheduler_config: dict,
    num_noises: int = 1000,
    steps: int = 50,
    solver: str = "ddim",
    descriptor: str = "pixels",
    seed: int = 0,
    batch_size: int = 250,
    inception: InceptionFeatures | None = None,
    clamp: bool = True,
) -> PFDResult:
    """PFD(p, q) over `num_noises` shared noises, and its standard error.

    Args:
        p, q: denoisers with UNet2DModel's call signature (a UNet, an `EmpiricalDenoiser`) of the same image shape.
        scheduler_config: the DDPMScheduler config both were trained under (its noise schedule).
        num_noises: the noises z.
        steps: solver steps.
        solver: "ddim" (eta = 0) or "dpm-solver++".
        descriptor: "pixels" (L2-normalised pixels), "identity" (raw pixels) or "inception" (InceptionV3 features;
            pass `inception`).
        seed: the noise stream.
        batch_size: images per model call.
        inception: the feature network for descriptor "inception".
        clamp: clamp Phi's images to [-1, 1], the data range of images (False for data that is not images).

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> blocks = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        ...                    norm_num_groups=4, **blocks)
        >>> pfd(unet, unet, DDPMScheduler().config, num_noises=4, steps=5)["pfd"]
        0.0
    """
    shapes = [(m.config.in_channels, m.config.sample_size) for m in (p, q)]
    if shapes[0] != shapes[1]:
        (c, n), (c_p, n_p) = shapes[1], shapes[0]
        raise FlatError(f"q: its images are {c}x{n}x{n}, p's {c_p}x{n_p}x{n_p}: PFD compares models of one shape", "q")
    if descriptor not in DESCRIPTORS:
        raise FlatError(f"descriptor must be one of {', '.join(DESCRIPTORS)}, got {descriptor!r}", "descriptor")
    if descriptor == "inception" and inception is None:
        raise FlatError("inception: pass the InceptionFeatures network for descriptor 'inception'", "inception")
    if num_noises < 2:
        raise FlatError(f"num_noises must be >= 2 for a standard error, got {num_noises}", "num_noises")
    ends = [flow_map(m, scheduler_config, num_noises, steps, solver, seed, batch_size) for m in (p, q)]
    outside = [
        float((images - images.clamp(-1, 1)).double().flatten(1).square().sum(1).mean().sqrt()) for images in ends
    ]
    if clamp:
        ends = [images.clamp(-1, 1) for images in ends]
    a, b = (pixels_or_features(images, descriptor, inception) for images in ends)
    squared = ((a - b) ** 2).sum(1).numpy()
    mean = float(squared.mean())
    distance = math.sqrt(mean)
    stderr_mean = float(squared.std(ddof=1) / math.sqrt(len(squared)))
    # delta method: d sqrt(m) = dm / (2 sqrt(m)); at distance 0 every term is 0 and so is the error
    stderr = stderr_mean / (2 * distance) if distance > 0 else 0.0
    return {
        "pfd": distance,
        "stderr": stderr,
        "num_noises": num_noises,
        "steps": steps,
        "solver": solver,
        "descriptor": descriptor,
        "outside": outside,
        "clamped": clamp,
    }
