"""Sharpness-Aware Minimization (Foret et al. 2021) and adaptive SAM (ASAM, Kwon et al. 2021, as SamsungLabs/ASAM
wrote it).

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

ASAM_ETA = 0.01  # SamsungLabs/ASAM's default offset of |w|
# Across processes, e comes from the all-reduced gradient (global: one process on the global batch) or from each
# rank's own (local: Foret et al.'s m-sharpness).
SAM_ASCENT_MODES = ("global", "local")


def check_rho(rho: float) -> None:
    """SAM's radius must be a number >= 0 (0 turns SAM off; the paper uses 0.1 for diffusion)."""
    if not rho >= 0:  # also catches nan
        raise FlatError(f"rho must be a number >= 0 (0 turns SAM off), got {rho}", parameter="rho")


class SAM:
    """The ascent step of SAM: moves parameters to w + e and back.

    `e = rho * g / ||g||` (global L2 norm over all parameters with a gradient). With `adaptive=True` (ASAM) the
    neighbourhood is scaled element-wise by T_w = |w| + eta on the parameters whose name contains "weight", as
    SamsungLabs/ASAM does (biases and normalisation shifts keep T_w = 1, so a parameter at zero still moves):
    `e = rho * T_w^2 g / ||T_w g||`.

    Args:
        named_params: (name, parameter) pairs, e.g. `model.named_parameters()`; frozen ones are left alone.
        rho: the neighbourhood's radius, >= 0.
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset of |w| (ASAM_ETA, ASAM's default), >= 0; only read with `adaptive`.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> sam = SAM(net.named_parameters(), rho=0.05, adaptive=True)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> norm = sam.ascend()  # at w + e now
        >>> sam.restore()  # back at w, bit for bit
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        rho: float,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
    ):
        check_rho(rho)
        if not eta >= 0:
            raise FlatError(f"eta must be a number >= 0 (ASAM's offset of |w|), got {eta}", parameter="eta")
        named = [(name, p) for name, p in named_params if p.requires_grad]
        self.params = [p for _, p in named]
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self._scaled = [adaptive and "weight" in name for name, _ in named]  # which parameters ASAM's T_w scales
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

        Returns the norm that e was normalised by (||g||, or ||T_w g|| for ASAM).
        """
        if self._moved:
            raise RuntimeError("SAM.ascend() called twice without SAM.restore()")
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            raise RuntimeError("SAM.ascend() needs gradients: run backward() first")
        pairs = [(self.params[i], self._backup[i]) for i in live]
        params = [p for p, _ in pairs]
        grads = [p.grad for p in params]
        scaled = [(p, g) for i, p, g in zip(live, params, grads) if self._scaled[i]]
        for p, g in scaled:
            g.mul_(p.abs().add_(self.eta))  # T_w g, T_w = |w| + eta
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        # e is built in place in the gradient buffers: no memory beyond the backup.
        torch._foreach_mul_(grads, self.rho / (norm + 1e-12))
        for p, g in scaled:
            g.mul_(p.abs().add_(self.eta))  # e = rho T_w^2 g / ||T_w g||
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
