"""Cheaper SAM: modes that take SAM's second forward/backward on some steps only, or replace its ascent by a
direction that costs no extra pass. `benchmarks/sam_overhead.py` measures their cost and
`studies/fashion-mnist-cheap-sam.yaml` what they keep of full SAM's flatness.

    mode      forward/backward passes     the gradient the base optimizer steps with
    full      2                           grad L(w + e), e = rho g / ||g||                  (Foret et al. 2021)
    every     2 every K steps, else 1     full SAM's on those steps, grad L(w) in between
    looksam   2 every K steps, else 1     in between g + alpha ||g|| / ||g_v|| g_v, g_v the part of the last SAM
                                          gradient orthogonal to its plain gradient         (Liu et al. 2022)
    momentum  1                           grad L(w - rho m / ||m||), m the base optimizer's first moment
                                                                                           (Becker et al. 2024)
    late      1, then 2 from start_step   plain steps, then full SAM                        (Zhou et al. 2024)
    random    1                           grad L(w + rho n), n LPF's filter-scaled Gaussian weight noise
                                                                               (Bisla et al. 2022; RWP)

`SAMMode.plan(step)` tells `training.step.train_step` which of four passes a step takes: "plain" (one pass at w),
"ascent" (SAM's two passes), "reuse" (one pass at w, then LookSAM's stored component added) or "perturbed" (one
pass at w + e, e given before the step).
"""

from __future__ import annotations

import torch

from diffusers_flat.errors import FlatError
from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.weight_noise import lpf_noise
from diffusers_flat.utils.seeding import weight_noise_generator

SAM_MODES = ("full", "every", "looksam", "momentum", "late", "random")
LOOKSAM_ALPHA = 0.7  # Liu et al.'s alpha


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def has_first_moment(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps a first moment momentum mode can read: Adam's `exp_avg` or SGD's momentum buffer."""
    defaults = optimizer.defaults
    return defaults["betas"][0] > 0 if "betas" in defaults else defaults.get("momentum", 0) > 0


class SAMMode:
    """SAM under one of `SAM_MODES`: which pass each optimizer step takes, and what the mode keeps between steps
    (LookSAM's orthogonal component, saved with the checkpoint).

    Args:
        sam: the `SAM` (or ASAM) that moves the parameters; its rho is also the length of momentum mode's step along
            -m / ||m|| and random mode's noise scale (LPF's sigma).
        mode: one of `SAM_MODES`.
        every: K of `every` and `looksam`: the steps whose index is a multiple of K take SAM's two passes.
        start_step: `late`'s first SAM step.
        looksam_alpha: LookSAM's alpha (>= 0).
        seed: random mode's noise at step s is a pure function of (seed, s).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        >>> sam = SAMMode(SAM(net.named_parameters(), rho=0.05), mode="looksam", every=5)
        >>> [sam.plan(step, optimizer, net)[0] for step in range(6)]
        ['ascent', 'reuse', 'reuse', 'reuse', 'reuse', 'ascent']
    """

    def __init__(
        self,
        sam: SAM,
        mode: str = "full",
        every: int = 1,
        start_step: int = 0,
        looksam_alpha: float = LOOKSAM_ALPHA,
        seed: int = 0,
    ):
        if mode not in SAM_MODES:
            raise FlatError(f"mode must be one of {SAM_MODES}, got {mode!r}", parameter="mode")
        if every < 1:
            raise FlatError(f"every must be >= 1, got {every}", parameter="every")
        if not looksam_alpha >= 0:
            raise FlatError(f"looksam_alpha must be >= 0, got {looksam_alpha}", parameter="looksam_alpha")
        if start_step < 0:
            raise FlatError(f"start_step must be >= 0, got {start_step}", parameter="start_step")
        self.sam = sam
        self.mode, self.every, self.start_step = mode, every, start_step
        self.looksam_alpha, self.seed = looksam_alpha, seed
        self._g_v: list[torch.Tensor] | None = None  # LookSAM's component, one tensor per parameter

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.sam.params

    def plan(
        self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module
    ) -> tuple[str, list[torch.Tensor] | None]:
        """The pass of optimizer step `step` (0-based) and, for "perturbed", its e (one tensor per parameter).
        `optimizer` is the base optimizer (momentum mode reads it), `model` the network whose parameters these are
        (random mode scales its noise by its filters)."""
        if self.mode == "full":
            return "ascent", None
        if self.mode == "every":
            return ("ascent" if step % self.every == 0 else "plain"), None
        if self.mode == "looksam":
            return ("ascent" if step % self.every == 0 or self._g_v is None else "reuse"), None
        if self.mode == "late":
            return ("ascent" if step >= self.start_step else "plain"), None
        if self.mode == "momentum":
            e = self.momentum_perturbation(optimizer)
            return ("plain", None) if e is None else ("perturbed", e)
        return "perturbed", self.random_perturbation(model, step)

    @torch.no_grad()
    def momentum_perturbation(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
        """MSAM's e = -rho m / ||m||, m the base optimizer's first moment (AdamW's `exp_avg`, SGD's
        `momentum_buffer`); None before the optimizer's first step, when there is no moment yet."""
        if not has_first_moment(optimizer):
            raise FlatError(
                f"mode 'momentum' needs an optimizer with a first moment (Adam, or SGD with momentum), got "
                f"{type(optimizer).__name__} with {optimizer.defaults}",
                parameter="mode",
            )
        state = [optimizer.state.get(p, {}) for p in self.params]
        moments = [s.get("exp_avg", s.get("momentum_buffer")) for s in state]
        if any(m is None for m in moments):
            return None
        # The weights came from w + m's direction: stepping back along -m looks where the loss was higher.
        return torch._foreach_mul(moments, -self.sam.rho / (_global_norm(moments) + 1e-12))

    @torch.no_grad()
    def random_perturbation(self, model: torch.nn.Module, step: int) -> list[torch.Tensor]:
        """Random mode's e = rho n, n LPF's filter-scaled unit Gaussian (`lpf_noise`), drawn from (seed, step)."""
        noise = lpf_noise(model, weight_noise_generator(self.seed, step))
        trained = {id(p) for p in self.params}
        e = [n for p, n in zip(model.parameters(), noise) if id(p) in trained]
        if len(e) != len(self.params):
            raise ValueError("model's trainable parameters are not the parameters SAMMode was given")
        return torch._foreach_mul(e, self.sam.rho)

    @torch.no_grad()
    def remember(self, plain: list[torch.Tensor], perturbed: list[torch.Tensor]) -> None:
        """LookSAM, on its SAM steps: keep g_v = g_s - (<g, g_s> / ||g||^2) g, the component of the SAM gradient
        g_s = grad L(w + e) orthogonal to the plain gradient g = grad L(w) (a non-finite pair is not kept)."""
        dot = torch.stack([torch.vdot(g.flatten(), g_s.flatten()) for g, g_s in zip(plain, perturbed)]).sum()
        coefficient = dot / _global_norm(plain).square()
        g_v = torch._foreach_sub(perturbed, torch._foreach_mul(plain, coefficient))
        if torch.isfinite(_global_norm(g_v)):
            self._g_v = g_v

    @torch.no_grad()
    def reuse_(self, grads: list[torch.Tensor]) -> None:
        """LookSAM, between its SAM steps: g <- g + alpha ||g|| / ||g_v|| g_v, in place."""
        scale = self.looksam_alpha * _global_norm(grads) / (_global_norm(self._g_v) + 1e-12)
        torch._foreach_add_(grads, torch._foreach_mul(self._g_v, scale))

    def state_dict(self) -> dict:
        return {"g_v": self._g_v}

    def load_state_dict(self, state: dict) -> None:
        g_v = state["g_v"]
        self._g_v = None if g_v is None else [v.to(p.device) for v, p in zip(g_v, self.params)]
