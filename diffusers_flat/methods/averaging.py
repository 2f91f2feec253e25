"""Weight averaging: SWA (Izmailov et al. 2018) and EMA, built on `torch.optim.swa_utils` and diffusers' `EMAModel`."""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch.optim.swa_utils import AveragedModel

from diffusers_flat.errors import FlatError


def resolve_swa_start(swa_start: float, max_train_steps: int) -> int:
    """The optimizer step from which SWA averages: `swa_start` is a fraction of training if below 1, else a step."""
    if not swa_start >= 0:  # also catches nan
        raise FlatError(
            f"swa_start must be >= 0 (a step, or a fraction of training below 1), got {swa_start}",
            parameter="swa_start",
        )
    step = round(swa_start * max_train_steps) if swa_start < 1 else int(swa_start)
    if step > max_train_steps or (swa_start >= 1 and swa_start != int(swa_start)):
        raise FlatError(
            f"swa_start {swa_start:g} is past the end of training ({max_train_steps} steps) or not a whole step; "
            f"use a step in [1, {max_train_steps}] or a fraction in [0, 1)",
            parameter="swa_start",
        )
    return step


def swa_due(step: int, swa_start: int, swa_cycle: int) -> bool:
    """Whether the weights after optimizer step `step` (1-based) join the SWA average: every `swa_cycle` steps from
    `swa_start` on."""
    return step >= swa_start and (step - swa_start) % swa_cycle == 0


def make_swa(model: torch.nn.Module) -> AveragedModel:
    """An equal-weight running average of `model`'s parameters: w_swa <- (n w_swa + w) / (n + 1)."""
    return AveragedModel(model)


def make_ema(
    model: UNet2DModel, max_decay: float, inv_gamma: float = 1.0, power: float = 3 / 4, warmup: bool = True
) -> EMAModel:
    """diffusers' EMA. With `warmup`, set up exactly as diffusers' `train_unconditional.py` does (the decay grows
    as 1 - (1 + step / inv_gamma)^-power up to `max_decay`); without, at `max_decay` from the second step on, as
    guided-diffusion's `ema_rate` (EMAModel copies the weights at its first step; min_decay pins the rest)."""
    return EMAModel(
        model.parameters(),
        decay=max_decay,
        min_decay=0.0 if warmup else max_decay,
        use_ema_warmup=warmup,
        inv_gamma=inv_gamma,
        power=power,
        model_cls=UNet2DModel,
        model_config=model.config,
    )


def averaged_unet(model: UNet2DModel, average: EMAModel | AveragedModel) -> UNet2DModel:
    """A standalone UNet2DModel holding the EMA or SWA weights (the training model is left as it is)."""
    if isinstance(average, AveragedModel):
        return copy.deepcopy(average.module)
    unet = copy.deepcopy(model)
    average.copy_to(unet.parameters())
    return unet
