"""Sharpness-Aware Minimization (Foret et al. 2021) and adaptive SAM (ASAM, Kwon et al. 2021).

SAM is a *perturbation* around an ordinary optimizer step, not an optimizer of its own:

    g = grad L(w)              first forward/backward
    w <- w + e(g)              SAM.ascend()
    g' = grad L(w + e)         second forward/backward on the same batch
    w <- w                     SAM.restore()
    base_optimizer.step()      with g'

Keeping it out of the optimizer lets `accelerate` prepare the base optimizer as usual: the learning-rate scheduler,
gradient clipping, mixed precision and checkpointing all see the plain optimizer. The training loop that calls these
two methods lives in `training/step.py`; `sam_modes.py` holds the cheaper modes that skip or replace the ascent.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diffusers_flat.errors import FlatError


def check_rho(rho: float) -> None:
    """SAM's radius must be a number >= 0 (0 turns SAM off; the paper uses 0.1 for diffusion)."""
    if not rho >= 0:  # also catches nan
        raise FlatError(f"rho must be a number >= 0 (0 turns SAM off), got {rho}", parameter="rho")


class SAM:
    """The ascent step of SAM: moves parameters to w + e and back.

    `e = rho * g / ||g||` (global L2 norm over all parameters with a gradient). With `adaptive=True` (ASAM) the
    neighbourhood is scaled element-wise by |w|: `e = rho * w^2 g / || |w| g ||`.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], rho: float, adaptive: bool = False):
        check_rho(rho)
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.adaptive = adaptive
        self._moved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        # One copy of the parameters, allocated once and reused every step: restoring by copy (not by
        # subtracting e) gives back w bit for bit.
        self._backup = [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]

    @property
    def is_moved(self) -> bool:
        """Whether the parameters are at w + e, waiting for `restore()`."""
        return bool(self._moved)

    @torch.no_grad()
    def ascend(self) -> torch.Tensor:
        """Move the parameters to w + e using their current gradients, which it consumes (sets to None).

        Returns the norm that e was normalised by (||g||, or || |w| g || for ASAM).
        """
        if self._moved:
            raise RuntimeError("SAM.ascend() called twice without SAM.restore()")
        pairs = [(p, b) for p, b in zip(self.params, self._backup) if p.grad is not None]
        if not pairs:
            raise RuntimeError("SAM.ascend() needs gradients: run backward() first")
        params = [p for p, _ in pairs]
        grads = [p.grad for p in params]
        if self.adaptive:
            for p, g in zip(params, grads):
                g.mul_(p.abs())
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # e is built in place in the gradient buffers: no memory beyond the backup.
        torch._foreach_mul_(grads, self.rho / (norm + 1e-12))
        if self.adaptive:
            for p, g in zip(params, grads):
                g.mul_(p.abs())
        self._move(pairs, grads)
        for p in params:
            p.grad = None
        return norm

    @torch.no_grad()
    def move(self, perturbation: list[torch.Tensor]) -> None:
        """Move the parameters to w + e for a given e (one tensor per parameter of `params`), as the one-pass modes
        of `sam_modes` do; `restore()` brings them back."""
        if self._moved:
            raise RuntimeError("SAM.move() called twice without SAM.restore()")
        if len(perturbation) != len(self.params):
            raise ValueError(f"perturbation has {len(perturbation)} tensors for {len(self.params)} parameters")
        self._move(list(zip(self.params, self._backup)), perturbation)

    def _move(self, pairs: list[tuple[torch.nn.Parameter, torch.Tensor]], e: list[torch.Tensor]) -> None:
        params = [p for p, _ in pairs]
        torch._foreach_copy_([b for _, b in pairs], params)
        torch._foreach_add_(params, e)  # w <- w + e
        self._moved = pairs

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the parameters saved by the last `ascend()`, leaving their gradients untouched."""
        if not self._moved:
            raise RuntimeError("SAM.restore() called without SAM.ascend()")
        torch._foreach_copy_([p for p, _ in self._moved], [b for _, b in self._moved])
        self._moved = []
