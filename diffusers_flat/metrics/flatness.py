"""Flatness of a trained network: LPF (Bisla et al. 2022), loss under perturbation (Cha et al. 2021, SWAD) and the
2-D filter-normalised loss surface (Li et al. 2018).

All three perturb a copy of the weights and evaluate a fixed loss; `DiffusionLoss` is the diffusion training loss on
a fixed set of (x0, t, eps) triples, identical for every draw and every model. None of these measures exists in a
maintained library for PyTorch modules (pyhessian measures curvature, not perturbed loss), so they are written here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypedDict

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from diffusers_flat.methods.input_perturbation import noisy_input_and_target
from diffusers_flat.methods.learned_variance import predicted_mean_part
from diffusers_flat.methods.weight_noise import lpf_noise

LossFn = Callable[[torch.nn.Module], float]


class LPFResult(TypedDict):
    lpf: float  # the mean loss over the draws
    stderr: float  # its standard error
    num_draws: int
    sigma: float


class PerturbationCurve(TypedDict):
    gamma: list[float]
    loss: list[float]  # the mean loss over the directions, at each gamma


class LossSurface(TypedDict):
    axis: list[float]
    loss: list[list[float]]  # loss[i][j] at w + axis[j] d1 + axis[i] d2


class DiffusionLoss:
    """The training loss (MSE to the scheduler's prediction target) of a UNet on fixed (x0, t, eps) triples:
    `loss(unet) -> float`, computed on the UNet's device.

    The triples are drawn once, on the CPU from `seed`, and moved to the device batch by batch: every device sees the
    same numbers, so losses agree across devices up to float rounding.
    """

    def __init__(self, scheduler: DDPMScheduler, images: torch.Tensor, seed: int = 0, batch_size: int = 256):
        generator = torch.Generator().manual_seed(seed)
        self.scheduler = scheduler
        self.images = images
        self.noise = torch.randn(images.shape, generator=generator)
        self.timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, unet: torch.nn.Module) -> float:
        total = 0.0
        for start in range(0, len(self.images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            device = _device_of(unet)
            images, noise, timesteps = (x[rows].to(device) for x in (self.images, self.noise, self.timesteps))
            noisy, target = noisy_input_and_target(self.scheduler, images, noise, timesteps)
            prediction = predicted_mean_part(unet(noisy, timesteps).sample, noisy)  # a learned variance is not scored
            total += torch.nn.functional.mse_loss(prediction, target, reduction="sum").item()
        return total / self.images.numel()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _filter_scales(param: torch.Tensor) -> torch.Tensor:
    """Per-filter norms broadcast to the parameter's shape: one filter per output channel/row."""
    norms = param.detach().flatten(1).norm(dim=1)
    return norms.view(-1, *([1] * (param.ndim - 1))).expand_as(param)


def random_direction(
    model: torch.nn.Module, generator: torch.Generator, filter_normalized: bool = True
) -> list[torch.Tensor]:
    """A Gaussian direction in weight space. Filter-normalised (Li et al.): each filter of a conv/linear weight is
    rescaled to the norm of that filter; biases and normalisation parameters get zero, so the picture ignores weight
    rescaling. Otherwise plain N(0, I) on every parameter."""
    direction = []
    for param in model.parameters():
        # Drawn on the CPU generator, then moved: the same direction on every device.
        d = torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device)
        if filter_normalized:
            d = (d / _filter_scales(d) * _filter_scales(param)) if param.ndim > 1 else torch.zeros_like(d)
        direction.append(d)
    return direction


@contextmanager
def perturbed(model: torch.nn.Module, directions: list[list[torch.Tensor]], scales: list[float]) -> Iterator[None]:
    """Temporarily move the weights to w + sum_i scales[i] * directions[i]."""
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for direction, scale in zip(directions, scales):
            for p, d in zip(model.parameters(), direction):
                p.add_(d, alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)


def lpf_flatness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    sigma: float = 0.01,
    num_draws: int = 100,
    seed: int = 0,
    filter_normalized: bool = True,
    show_progress: bool = True,
) -> LPFResult:
    """LPF (Bisla et al. 2022): the mean loss at w + sigma * n over `num_draws` draws of `lpf_noise` (their code:
    sigma 0.01, K = 100). Lower is flatter. Returns the mean, its standard error, K and sigma."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(num_draws), desc="LPF draws", disable=not show_progress, leave=False):
        with perturbed(model, [lpf_noise(model, generator, filter_normalized)], [sigma]):
            losses.append(loss_fn(model))
    values = np.asarray(losses)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"lpf": float(values.mean()), "stderr": stderr, "num_draws": num_draws, "sigma": sigma}


def _unit(direction: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction)).item()
    return [d / norm for d in direction]


def loss_under_perturbation(
    model: torch.nn.Module,
    loss_fn: LossFn,
    gammas: list[float],
    num_directions: int = 5,
    seed: int = 0,
    show_progress: bool = True,
) -> PerturbationCurve:
    """SWAD's flatness curve: the loss at w + gamma * d for random unit directions d (||d|| = 1 over all
    parameters), averaged over the directions, for each gamma."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    directions = [_unit(random_direction(model, generator, filter_normalized=False)) for _ in range(num_directions)]
    curve = []
    for gamma in tqdm(gammas, desc="Perturbation curve", disable=not show_progress, leave=False):
        losses = []
        for direction in directions:
            with perturbed(model, [direction], [gamma]):
                losses.append(loss_fn(model))
        curve.append(float(np.mean(losses)))
    return {"gamma": list(map(float, gammas)), "loss": curve}


def loss_surface(
    model: torch.nn.Module,
    loss_fn: LossFn,
    extent: float = 1.0,
    resolution: int = 11,
    seed: int = 0,
    show_progress: bool = True,
) -> LossSurface:
    """Li et al.'s picture: the loss on the plane w + a d1 + b d2, with filter-normalised random d1, d2 and
    a, b in [-extent, extent]."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    d1, d2 = random_direction(model, generator), random_direction(model, generator)
    axis = np.linspace(-extent, extent, resolution)
    grid = np.zeros((resolution, resolution))
    with tqdm(total=resolution**2, desc="Loss surface", disable=not show_progress, leave=False) as progress:
        for i, b in enumerate(axis):
            for j, a in enumerate(axis):
                with perturbed(model, [d1, d2], [float(a), float(b)]):
                    grid[i, j] = loss_fn(model)
                progress.update(1)
    return {"axis": axis.tolist(), "loss": grid.tolist()}
