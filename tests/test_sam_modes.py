"""The cheap SAM modes: each against a hand computation on a quadratic toy, the degenerate settings against full SAM
and plain training bit for bit, and fp16's skipped steps."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from helpers import fixed_batch, micro_unet

from diffusers_flat.errors import FlatError
from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import SAM_MODES, SAMMode, sam_mode
from diffusers_flat.training.step import MicroBatch, train_step
from diffusers_flat.utils.seeding import weight_noise_generator

SHAPE, LR, RHO, BATCH = (1, 2, 3), 0.1, 0.3, 5
A = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25, 1.5]).view(SHAPE)  # anisotropic: SAM's gradient leaves g's direction


class QuadraticToy(torch.nn.Module):
    """A 'denoiser' predicting r = A u + v whatever its input: the diffusion loss (epsilon-MSE) of a batch is
    L = mean_i mean_j (r_j - eps_ij)^2, whose gradient is written out in `hand_gradient`. Calls listed in `poisoned`
    return inf."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.u = torch.nn.Parameter(torch.randn(SHAPE, generator=generator))
        self.v = torch.nn.Parameter(torch.randn(SHAPE, generator=generator))
        self.calls, self.poisoned = 0, set()

    def forward(self, sample, timestep):
        r = A * self.u + self.v
        if self.calls in self.poisoned:
            r = r * math.inf
        self.calls += 1
        return SimpleNamespace(sample=r.expand(len(sample), *SHAPE))


def hand_gradient(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """dL/du = A dL/dr and dL/dv = dL/dr, with dL/dr = (2/d)(A u + v - mean_i eps_i); x = (u, v) flattened."""
    u, v = x[: A.numel()].view(SHAPE), x[A.numel() :].view(SHAPE)
    d_r = 2 / A.numel() * (A * u + v - noise.mean(0))
    return torch.cat([(A * d_r).flatten(), d_r.flatten()])


def toy_batches(steps: int) -> list[MicroBatch]:
    generator = torch.Generator().manual_seed(1)
    return [
        MicroBatch(
            torch.zeros(BATCH, *SHAPE),
            torch.randn(BATCH, *SHAPE, generator=generator),
            torch.zeros(BATCH, dtype=torch.long),
        )
        for _ in range(steps)
    ]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).double()


def train_toy(mode: str | None, steps: int, momentum: float = 0.0, accelerator=None, model=None, **options):
    """`steps` steps of the toy through `train_step` with SGD; returns the model and the last step's stats."""
    accelerator = accelerator or Accelerator(cpu=True)
    model = model or QuadraticToy()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    sam = None if mode is None else sam_mode(SAM(model.named_parameters(), rho=RHO), mode, **options)
    stats = None
    for step, batch in enumerate(toy_batches(steps)):
        stats = train_step(
            accelerator, prepared, optimizer, DDPMScheduler(), [batch], sam=sam, step=step, max_grad_norm=0
        )
    return model, stats


def test_looksam_matches_a_hand_computation():
    alpha, steps = 0.7, 5
    x = flat(QuadraticToy())
    for step, batch in enumerate(toy_batches(steps)):
        g = hand_gradient(x, batch.noise.double())
        if step % 2 == 0:  # SAM, and keep the part of its gradient orthogonal to g
            g_s = hand_gradient(x + RHO * g / g.norm(), batch.noise.double())
            g_v = g_s - (g @ g_s) / (g @ g) * g
            x = x - LR * g_s
        else:  # g + alpha ||g|| / ||g_v|| g_v
            x = x - LR * (g + alpha * g.norm() / g_v.norm() * g_v)
    assert g_v.norm() > 0.05 * g.norm()  # the toy's component is not negligible
    model, _ = train_toy("looksam", steps, every=2, looksam_alpha=alpha)
    torch.testing.assert_close(flat(model), x, rtol=1e-5, atol=1e-6)
    every, _ = train_toy("every", steps, every=2)  # and reusing g_v is not a plain step
    assert (flat(every) - x).abs().max() > 1e-4


def test_momentum_mode_matches_a_hand_computation():
    mu, steps = 0.9, 4
    x, buffer = flat(QuadraticToy()), None
    for batch in toy_batches(steps):
        # MSAM: the gradient at w - rho m / ||m|| (a plain one before the first step leaves a moment)
        at = x if buffer is None else x - RHO * buffer / buffer.norm()
        g = hand_gradient(at, batch.noise.double())
        buffer = g if buffer is None else mu * buffer + g  # torch's SGD momentum, dampening 0
        x = x - LR * buffer
    model, stats = train_toy("momentum", steps, momentum=mu)
    torch.testing.assert_close(flat(model), x, rtol=1e-5, atol=1e-6)
    assert stats.sharpness is None  # one pass measures no sharpness


def test_momentum_mode_reads_adams_first_moment():
    model = QuadraticToy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.8, 0.999))
    sam = sam_mode(SAM(model.named_parameters(), rho=RHO), "momentum")
    assert sam.perturbation(0, optimizer, model) is None  # no moment before the first step: a plain step
    batch = toy_batches(1)[0]
    g = hand_gradient(flat(model), batch.noise.double())
    for p, grad in zip(model.parameters(), g.split(A.numel())):
        p.grad = grad.view(SHAPE).float()
    optimizer.step()
    e = sam.perturbation(1, optimizer, model)
    m = 0.2 * g  # Adam's exp_avg after one step: (1 - beta1) g
    torch.testing.assert_close(torch.cat([t.flatten() for t in e]).double(), -RHO * m / m.norm(), rtol=1e-5, atol=1e-7)
    with pytest.raises(FlatError, match="needs an optimizer with a first moment"):
        sam.perturbation(1, torch.optim.SGD(model.parameters(), lr=1), model)


def test_random_mode_matches_a_hand_computation():
    steps, seed = 3, 11
    x = flat(QuadraticToy())
    for step, batch in enumerate(toy_batches(steps)):
        # N(0, 1) on each parameter in order (the toy has no filters to scale by), from the step's own stream
        generator = weight_noise_generator(seed, step)
        noise = torch.cat([torch.randn(SHAPE, generator=generator).flatten() for _ in range(2)]).double()
        x = x - LR * hand_gradient(x + RHO * noise, batch.noise.double())
    model, stats = train_toy("random", steps, seed=seed)
    torch.testing.assert_close(flat(model), x, rtol=1e-5, atol=1e-6)
    assert stats.sharpness is None


def test_random_mode_scales_its_noise_by_the_filters_and_leaves_frozen_parameters_alone():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[1].bias.requires_grad_(False)
    sam = sam_mode(SAM(net.named_parameters(), rho=RHO), "random", seed=5)
    e = sam.perturbation(7, None, net)
    generator = weight_noise_generator(5, 7)
    draws = [torch.randn(p.shape, generator=generator) for p in net.parameters()]  # every parameter draws
    expected = []
    for layer, (n_w, n_b) in zip(net, zip(draws[0::2], draws[1::2])):
        s = layer.weight.detach().norm(dim=1) + layer.bias.detach().abs()  # Bisla et al.'s ||w_f|| + |b_f|
        expected += [RHO * n_w * s[:, None]] + ([RHO * n_b * s] if layer.bias.requires_grad else [])
    assert len(e) == 3
    for got, want in zip(e, expected):
        torch.testing.assert_close(got, want)


def unet_run(sam_options: dict | None, steps: int = 3) -> dict[str, torch.Tensor]:
    model = micro_unet()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    sam = None if sam_options is None else sam_mode(SAM(model.named_parameters(), rho=0.2), **sam_options)
    for step in range(steps):
        train_step(accelerator, prepared, optimizer, DDPMScheduler(), [fixed_batch()], sam=sam, step=step)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_degenerate_modes_equal_full_sam_and_plain_training_bit_for_bit():
    full = unet_run({"mode": "full"})
    assert_same(unet_run({"mode": "every", "every": 1}), full)
    assert_same(unet_run({"mode": "looksam", "every": 1}), full)
    assert_same(unet_run({"mode": "late", "start_step": 0}), full)
    plain = unet_run(None)
    assert_same(unet_run({"mode": "late", "start_step": 3}), plain)  # the start past the last step
    assert any(not torch.equal(full[n], plain[n]) for n in full)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "half"}, "mode must be one of"),
        ({"mode": "every", "every": 0}, "every must be >= 1"),
        ({"mode": "looksam", "looksam_alpha": -1.0}, "looksam_alpha must be >= 0"),
        ({"mode": "late", "start_step": -1}, "start_step must be >= 0"),
    ],
)
def test_bad_options_name_the_parameter(options, message):
    with pytest.raises(FlatError, match=message):
        sam_mode(SAM(QuadraticToy().named_parameters(), rho=RHO), **options)


def fp16_accelerator() -> Accelerator:
    """accelerate offers fp16 loss scaling only on GPUs: on the CPU, the real torch GradScaler is put where
    accelerate keeps its own, before `prepare`, so that `backward`, `clip_grad_norm_` and the optimizer's step run
    accelerate's fp16 path. (accelerate's state is process-wide: it is reset first, and after the test.)"""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    accelerator.native_amp = True
    return accelerator


@pytest.fixture
def fp16():
    yield fp16_accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("mode", ["full", "looksam", "momentum", "random", "every"])
def test_fp16_loss_scaling_gives_the_fp32_steps(mode, fp16):
    # Scaling by a power of two and back is exact: the scaled steps must be the fp32 ones.
    options = {"every": 2} if mode in ("looksam", "every") else {}
    fp32, _ = train_toy(mode, 4, momentum=0.9, **options)
    scaled, _ = train_toy(mode, 4, momentum=0.9, accelerator=fp16(), **options)
    torch.testing.assert_close(flat(scaled), flat(fp32), rtol=0, atol=0)


@pytest.mark.parametrize("poisoned_pass", [0, 1], ids=["ascent pass", "descent pass"])
def test_fp16_skips_a_sam_step_with_an_inf_and_leaves_the_weights_as_they_were(poisoned_pass, fp16):
    accelerator, model = fp16(), QuadraticToy()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    sam = SAMMode(SAM(model.named_parameters(), rho=RHO))
    first, second, third = toy_batches(3)

    def step(batch):
        return train_step(accelerator, prepared, optimizer, DDPMScheduler(), [batch], sam=sam, max_grad_norm=1.0)

    step(first)  # a good step: the momentum buffer exists, the scale stays 2^12
    before, momentum = flat(model), optimizer.state[model.u]["momentum_buffer"].clone()
    scale = accelerator.scaler.get_scale()
    model.poisoned = {model.calls + poisoned_pass}  # inf in the first or the second forward pass of the next step
    stats = step(second)
    assert torch.equal(flat(model), before) and not sam.sam.is_moved
    assert torch.equal(optimizer.state[model.u]["momentum_buffer"], momentum)
    assert optimizer.step_was_skipped and stats.sharpness is None
    assert accelerator.scaler.get_scale() == scale * 0.5  # the scaler backs off
    step(third)  # and the next step, finite, trains again
    assert not torch.equal(flat(model), before) and not optimizer.step_was_skipped


def test_each_mode_takes_two_passes_on_its_own_schedule():
    model = QuadraticToy()
    optimizer = torch.optim.AdamW(model.parameters())
    before = flat(model)

    def passes(sam: SAMMode, steps: int = 6) -> list[bool]:
        two = []
        for step in range(steps):
            two.append(sam.begin(step, optimizer, model))
            assert not sam.end()  # no ascent was taken: nothing measured, and the weights are back at w
            assert torch.equal(flat(model), before)
        return two

    def make(**options) -> SAMMode:
        return sam_mode(SAM(model.named_parameters(), rho=RHO), **options)

    assert passes(make(mode="full")) == [True] * 6
    assert passes(make(mode="every", every=3)) == [True, False, False, True, False, False]
    assert passes(make(mode="late", start_step=4)) == [False] * 4 + [True] * 2
    assert passes(make(mode="random")) == [False] * 6  # one pass, at w + e: moved in begin, back in end
    # LookSAM has nothing to reuse until its first SAM step has kept a component
    looksam = make(mode="looksam", every=3)
    assert passes(looksam, 3) == [True] * 3
    looksam.remember([torch.ones(SHAPE)] * 2, [torch.ones(SHAPE), -torch.ones(SHAPE)])
    kept = looksam.state_dict()["g_v"]  # g_s - (<g, g_s> / ||g||^2) g with <g, g_s> = 0: g_s itself
    assert torch.equal(kept[0], torch.ones(SHAPE)) and torch.equal(kept[1], -torch.ones(SHAPE))
    assert passes(looksam) == [True, False, False, True, False, False]  # in between, g_v is reused


def test_only_looksam_keeps_state_for_the_checkpoint():
    model = QuadraticToy()
    kept = {mode: sam_mode(SAM(model.named_parameters(), rho=RHO), mode).keeps_state for mode in SAM_MODES}
    assert kept == {mode: mode == "looksam" for mode in SAM_MODES}
