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

Each mode is one object around a `SAM` (which moves the weights), owning its own state, and `train_step` calls the
same four methods of any of them at fixed points of a step, with no branch on the mode:

    begin(step, optimizer, model) -> bool   before the first pass: whether the step takes SAM's two passes (a
                                            one-pass mode at w + e moves the weights here)
    ascend()                                on a two-pass step, after the first backward: w <- w + e(g)
    adjust_(grads)                          after the last backward, before clipping: the descent gradient, in place
    end() -> bool                           after clipping: the weights back at w; whether the step measured
                                            L(w + e) - L(w) (took SAM's second pass)

`sam_mode(sam, name, ...)` makes the mode of a name of `SAM_MODES`.
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
    """Full SAM (Foret et al. 2021): SAM's two passes on every step. The base of every mode: the four calls of
    `train_step` and the checkpointed state (none here).

    Args:
        sam: the `SAM` (or ASAM) that moves the parameters; its rho is also the length of momentum mode's step along
            -m / ||m|| and random mode's noise scale (LPF's sigma).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> sam = SAMMode(SAM(net.named_parameters(), rho=0.05))
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> two_passes = sam.begin(0, optimizer, net)  # True: then forward/backward at w
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> sam.ascend()  # at w + e: forward/backward again, then clip
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> sam.end()  # back at w, g' = grad L(w + e) left for the optimizer's step
        True
    """

    keeps_state = False  # whether the mode has state a checkpoint must keep (`state_dict`)

    def __init__(self, sam: SAM):
        self.sam = sam

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.sam.params

    def grads(self) -> list[torch.Tensor]:
        """The parameters' current gradients."""
        return [p.grad for p in self.params if p.grad is not None]

    def begin(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
        """Before step `step`'s (0-based) first pass: whether it takes SAM's two passes. `optimizer` is the base
        optimizer (momentum mode reads it), `model` the network whose parameters these are (random mode scales its
        noise by its filters)."""
        return True

    def ascend(self) -> None:
        """After the first pass's backward: w <- w + e(g) (`SAM.ascend`, which consumes g)."""
        self.sam.ascend()

    def adjust_(self, grads: list[torch.Tensor]) -> None:
        """The descent gradient, changed in place before clipping (LookSAM's reuse); full SAM leaves it."""

    def end(self) -> bool:
        """After clipping: back at w if the weights were moved; whether the step took SAM's second pass."""
        if not self.sam.is_moved:
            return False  # a skipped ascent (a non-finite fp16 gradient)
        self.sam.restore()
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EverySAM(SAMMode):
    """SAM's two passes on the steps whose index is a multiple of `every` (>= 1), plain steps in between."""

    def __init__(self, sam: SAM, every: int):
        super().__init__(sam)
        self.every = _check_every(every)

    def begin(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
        return step % self.every == 0


class LateSAM(SAMMode):
    """Plain steps, then full SAM from `start_step` (>= 0) on (Zhou et al. 2024)."""

    def __init__(self, sam: SAM, start_step: int):
        super().__init__(sam)
        if start_step < 0:
            raise FlatError(f"start_step must be >= 0, got {start_step}", parameter="start_step")
        self.start_step = start_step

    def begin(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
        return step >= self.start_step


class LookSAM(SAMMode):
    """LookSAM (Liu et al. 2022): SAM's two passes every `every` steps, keeping the part g_v of the SAM gradient
    orthogonal to the plain one (saved with the checkpoint); in between, one pass whose gradient g is pushed along g_v
    by `alpha` (>= 0) ||g|| / ||g_v||."""

    keeps_state = True

    def __init__(self, sam: SAM, every: int, alpha: float = LOOKSAM_ALPHA):
        super().__init__(sam)
        self.every = _check_every(every)
        if not alpha >= 0:
            raise FlatError(f"looksam_alpha must be >= 0, got {alpha}", parameter="looksam_alpha")
        self.alpha = alpha
        self._g_v: list[torch.Tensor] | None = None  # one tensor per parameter
        self._reusing = False
        self._plain: list[torch.Tensor] | None = None  # a SAM step's plain gradient, until its SAM gradient exists

    def begin(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
        self._reusing = step % self.every != 0 and self._g_v is not None  # nothing to reuse before a SAM step
        self._plain = None
        return not self._reusing

    def ascend(self) -> None:
        self._plain = [g.clone() for g in self.grads()]
        super().ascend()

    def adjust_(self, grads: list[torch.Tensor]) -> None:
        if self._reusing:
            self.reuse_(grads)

    def end(self) -> bool:
        took_two = super().end()
        if took_two:
            self.remember(self._plain, self.grads())
        return took_two

    @torch.no_grad()
    def remember(self, plain: list[torch.Tensor], perturbed: list[torch.Tensor]) -> None:
        """On its SAM steps: keep g_v = g_s - (<g, g_s> / ||g||^2) g, the component of the SAM gradient
        g_s = grad L(w + e) orthogonal to the plain gradient g = grad L(w) (a non-finite pair is not kept)."""
        dot = torch.stack([torch.vdot(g.flatten(), g_s.flatten()) for g, g_s in zip(plain, perturbed)]).sum()
        coefficient = dot / _global_norm(plain).square()
        g_v = torch._foreach_sub(perturbed, torch._foreach_mul(plain, coefficient))
        if torch.isfinite(_global_norm(g_v)):
            self._g_v = g_v

    @torch.no_grad()
    def reuse_(self, grads: list[torch.Tensor]) -> None:
        """Between its SAM steps: g <- g + alpha ||g|| / ||g_v|| g_v, in place."""
        scale = self.alpha * _global_norm(grads) / (_global_norm(self._g_v) + 1e-12)
        torch._foreach_add_(grads, torch._foreach_mul(self._g_v, scale))

    def state_dict(self) -> dict:
        return {"g_v": self._g_v}

    def load_state_dict(self, state: dict) -> None:
        g_v = state["g_v"]
        self._g_v = None if g_v is None else [v.to(p.device) for v, p in zip(g_v, self.params)]


class OnePassSAM(SAMMode):
    """A mode whose one pass is at w + e, e given before the step (`perturbation`): the gradient at w + e costs no
    extra pass, and the step measures no sharpness."""

    def perturbation(
        self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module
    ) -> list[torch.Tensor] | None:
        """Step `step`'s e, one tensor per parameter, or None for a plain step."""
        raise NotImplementedError

    def begin(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
        e = self.perturbation(step, optimizer, model)
        if e is not None:
            self.sam.move(e)  # the one pass is at w + e
        return False

    def end(self) -> bool:
        if self.sam.is_moved:
            self.sam.restore()
        return False


class MomentumSAM(OnePassSAM):
    """MSAM (Becker et al. 2024): the gradient at w - rho m / ||m||, m the base optimizer's first moment."""

    @torch.no_grad()
    def perturbation(
        self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module
    ) -> list[torch.Tensor] | None:
        """e = -rho m / ||m||, m AdamW's `exp_avg` or SGD's `momentum_buffer`; None before the optimizer's first step,
        when there is no moment yet."""
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


class RandomSAM(OnePassSAM):
    """Random weight perturbation (Bisla et al. 2022; RWP): the gradient at w + rho n, n LPF's filter-scaled
    Gaussian weight noise, drawn at step s from (`seed`, s)."""

    def __init__(self, sam: SAM, seed: int = 0):
        super().__init__(sam)
        self.seed = seed

    @torch.no_grad()
    def perturbation(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[torch.Tensor]:
        """e = rho n, n LPF's filter-scaled unit Gaussian (`lpf_noise`)."""
        noise = lpf_noise(model, weight_noise_generator(self.seed, step))
        trained = {id(p) for p in self.params}
        e = [n for p, n in zip(model.parameters(), noise) if id(p) in trained]
        if len(e) != len(self.params):
            raise ValueError("model's trainable parameters are not the parameters the mode was given")
        return torch._foreach_mul(e, self.sam.rho)


def _check_every(every: int) -> int:
    if every < 1:
        raise FlatError(f"every must be >= 1, got {every}", parameter="every")
    return every


def sam_mode(
    sam: SAM,
    mode: str = "full",
    every: int = 1,
    start_step: int = 0,
    looksam_alpha: float = LOOKSAM_ALPHA,
    seed: int = 0,
) -> SAMMode:
    """The mode named `mode` (one of `SAM_MODES`) around `sam`, given the options it reads: `every` (every,
    looksam), `start_step` (late), `looksam_alpha` (looksam), `seed` (random).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 1)
        >>> type(sam_mode(SAM(net.named_parameters(), rho=0.05), "looksam", every=5)).__name__
        'LookSAM'
    """
    if mode not in SAM_MODES:
        raise FlatError(f"mode must be one of {SAM_MODES}, got {mode!r}", parameter="mode")
    if mode == "every":
        return EverySAM(sam, every)
    if mode == "looksam":
        return LookSAM(sam, every, looksam_alpha)
    if mode == "late":
        return LateSAM(sam, start_step)
    if mode == "momentum":
        return MomentumSAM(sam)
    if mode == "random":
        return RandomSAM(sam, seed)
    return SAMMode(sam)
