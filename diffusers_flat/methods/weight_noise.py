"""LPF's weight noise (Bisla et al. 2022): Gaussian noise on every parameter, scaled per filter by the filter's norm.

One owner for the two that draw it: the LPF flatness measure (`metrics.flatness.lpf_flatness`) and SAM's random
mode (`methods.sam_modes`), which trains at the weights this noise perturbs.
"""

from __future__ import annotations

import torch


def _lpf_filter_scales(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Bisla et al.'s per-filter scale s_f = ||w_f|| + |b_f| for every module with a conv/linear-shaped weight (one
    filter per output channel/row) and its bias, broadcast to each parameter's shape, keyed by `id(parameter)`."""
    scales = {}
    for module in model.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim < 2:
            continue
        s = weight.detach().flatten(1).norm(dim=1)
        if isinstance(bias, torch.nn.Parameter):
            s = s + bias.detach().abs()
            scales[id(bias)] = s
        scales[id(weight)] = s.view(-1, *([1] * (weight.ndim - 1))).expand_as(weight)
    return scales


def lpf_noise(
    model: torch.nn.Module, generator: torch.Generator, filter_normalized: bool = True
) -> list[torch.Tensor]:
    """LPF's Gaussian weight noise at unit sigma, one tensor per parameter.

    Filter-normalised (Bisla et al.): each conv/linear filter f is normalised, w_f / s_f and b_f / s_f with
    s_f = ||w_f|| + |b_f|, and every parameter of the normalised network gets N(0, 1) noise (sigma applied by the
    caller). Mapped back to the trained weights this is noise s_f * N(0, 1) on filter f's weight and bias and
    N(0, 1) on every other parameter (GroupNorm scales and shifts). Their networks put a BatchNorm after each filter,
    which makes the normalisation itself invisible; a UNet's GroupNorm mixes the channels of a group and its output
    conv has no norm at all, so normalising without mapping back would change the function before any noise is
    added: mapped back, the loss at sigma = 0 is the trained model's. Otherwise plain N(0, 1) on every parameter.
    Frozen parameters (requires_grad False, e.g. the zeroed time embedding of a noise-unconditional UNet) are left
    alone: their noise is zero and draws none, so the others' draws do not depend on them.
    """
    scales = _lpf_filter_scales(model) if filter_normalized else {}
    noise = []
    for param in model.parameters():
        if not param.requires_grad:  # training never moved it: not part of the minimum's neighbourhood
            noise.append(torch.zeros_like(param))
            continue
        # Drawn on the CPU generator, then moved: the same draws on every device.
        n = torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device)
        # w_f + sigma s_f n == s_f (w_f / s_f + sigma n): the normalised filter perturbed, mapped back
        noise.append(n * scales[id(param)] if id(param) in scales else n)
    return noise
