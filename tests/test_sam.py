"""SAM/ASAM steps against a hand computation, and the two passes seeing one batch."""

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET, fixed_batch, micro_unet
from torch.func import functional_call

from diffusers_flat.errors import FlatError
from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import SAMMode
from diffusers_flat.training.step import MicroBatch, train_step

LR = 0.05


def hand_loss(model, params: dict, batch: MicroBatch) -> torch.Tensor:
    """The epsilon-MSE written out: linear betas 1e-4..0.02 over 1000 steps, no library noising."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()[batch.timesteps]
    abar = abar.view(-1, 1, 1, 1)
    noisy = abar.sqrt() * batch.clean + (1 - abar).sqrt() * batch.noise
    prediction = functional_call(model, params, (noisy, batch.timesteps)).sample
    return ((prediction - batch.noise) ** 2).mean()


def hand_sam_sgd_step(model, batch, rho, adaptive, max_grad_norm):
    """g = grad L(w); e = rho g/||g|| (ASAM as SamsungLabs/ASAM: rho T^2 g/||T g||, T = |w| + 0.01 on parameters named
    "weight", 1 on the others); g' = grad L(w+e), clipped; w - lr g'."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.autograd.grad(hand_loss(model, {n: w[n].requires_grad_() for n in names}, batch), [w[n] for n in names])
    g = dict(zip(names, g))
    scale = {n: (w[n].detach().abs() + 0.01 if adaptive and "weight" in n else torch.ones_like(w[n])) for n in names}
    norm = torch.sqrt(sum(((scale[n] * g[n]) ** 2).sum() for n in names))
    w_hat = {n: (w[n].detach() + rho * scale[n] ** 2 * g[n] / norm).requires_grad_() for n in names}
    g2 = dict(zip(names, torch.autograd.grad(hand_loss(model, w_hat, batch), [w_hat[n] for n in names])))
    total = torch.sqrt(sum((g2[n] ** 2).sum() for n in names))
    clip = min(1.0, max_grad_norm / (total.item() + 1e-6)) if max_grad_norm > 0 else 1.0
    return {n: w[n].detach() - LR * clip * g2[n] for n in names}


def library_step(model, batch, sam_rho, adaptive=False, max_grad_norm=0.0, use_sam=True):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    sam = SAMMode(SAM(model.named_parameters(), rho=sam_rho, adaptive=adaptive)) if use_sam else None
    train_step(accelerator, prepared, optimizer, DDPMScheduler(), [batch], sam=sam, max_grad_norm=max_grad_norm)
    return dict(model.named_parameters())


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05], ids=["no-clip", "clip"])
def test_sam_step_matches_hand_computation(adaptive, max_grad_norm):
    model, batch = micro_unet(), fixed_batch()
    expected = hand_sam_sgd_step(copy.deepcopy(model), batch, rho=0.5, adaptive=adaptive, max_grad_norm=max_grad_norm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = library_step(model, batch, sam_rho=0.5, adaptive=adaptive, max_grad_norm=max_grad_norm)
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-4, atol=1e-6, msg=name)
        moved += (value - before[name]).abs().sum().item()
    assert moved > 0


def test_sam_differs_from_plain_step():
    # The hand computation above would also pass for a SAM that ignored rho if e were tiny: make sure it is not.
    batch = fixed_batch()
    plain = library_step(micro_unet(), batch, sam_rho=0.0, use_sam=False)
    sam = library_step(micro_unet(), batch, sam_rho=0.5)
    assert max((plain[n] - sam[n]).abs().max().item() for n in plain) > 1e-4


def test_rho_zero_equals_plain_step():
    batch = fixed_batch()
    plain = library_step(micro_unet(), batch, sam_rho=0.0, use_sam=False)
    zero = library_step(micro_unet(), batch, sam_rho=0.0)
    for name in plain:
        torch.testing.assert_close(zero[name], plain[name], rtol=0, atol=0)


def test_with_dropout_rho_zero_still_equals_plain_step():
    """rho = 0 puts the second pass at w itself: its gradient equals the first pass's only if both passes draw the
    same dropout masks."""
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **{**MICRO_UNET, "dropout": 0.5})
    steps = {}
    for use_sam in (False, True):
        torch.manual_seed(7)  # the dropout masks of the step
        steps[use_sam] = library_step(copy.deepcopy(model).train(), fixed_batch(), sam_rho=0.0, use_sam=use_sam)
    for name, value in steps[False].items():
        torch.testing.assert_close(steps[True][name], value, rtol=0, atol=0, msg=name)
    # and the masks do matter here: another draw moves the weights elsewhere
    torch.manual_seed(8)
    other = library_step(copy.deepcopy(model).train(), fixed_batch(), sam_rho=0.0, use_sam=False)
    assert any(not torch.equal(other[n], steps[False][n]) for n in other)


def test_asam_moves_a_bias_at_zero_as_samsunglabs_asam_does():
    # A one-layer net, its bias at zero: ASAM's T = |w| + eta scales only the weight, so the bias moves by
    # rho g_b / ||T g|| (the |w| form of e gave it exactly 0). Hand computation: loss = (w.x + b)^2 / 2 at x = (2, 1).
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -0.25]]))
        net.bias.zero_()
    (0.5 * net(torch.tensor([[2.0, 1.0]])).square().sum()).backward()
    r = 0.5 * 2.0 - 0.25 * 1.0  # the residual w.x + b = 0.75; d/dw = r x, d/db = r
    g_w, g_b = [r * 2.0, r * 1.0], r
    t_w = [0.5 + 0.01, 0.25 + 0.01]
    norm = math.sqrt((t_w[0] * g_w[0]) ** 2 + (t_w[1] * g_w[1]) ** 2 + g_b**2)
    rho = 0.5
    sam = SAM(net.named_parameters(), rho=rho, adaptive=True)
    returned = sam.ascend()
    assert returned.item() == pytest.approx(norm)
    expected_w = [0.5 + rho * t_w[0] ** 2 * g_w[0] / norm, -0.25 + rho * t_w[1] ** 2 * g_w[1] / norm]
    assert net.weight.detach().flatten().tolist() == pytest.approx(expected_w)
    assert net.bias.item() == pytest.approx(rho * g_b / norm) and net.bias.item() > 0.1
    sam.restore()
    assert net.bias.item() == 0.0


def test_asam_eta_must_not_be_negative():
    with pytest.raises(FlatError, match="eta must be a number >= 0"):
        SAM(torch.nn.Linear(2, 1).named_parameters(), rho=0.1, adaptive=True, eta=-1.0)


def test_restore_gives_back_exact_weights():
    model = micro_unet()
    before = [p.detach().clone() for p in model.parameters()]
    hand_loss(model, dict(model.named_parameters()), fixed_batch()).backward()
    sam = SAM(model.named_parameters(), rho=0.3)
    sam.ascend()
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class Recorder(torch.nn.Module):
    """Passes through to a UNet and remembers every input it was given."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls = []

    def forward(self, sample, timestep):
        self.calls.append((sample.detach().clone(), timestep.detach().clone()))
        return self.unet(sample, timestep)


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_both_passes_see_the_same_inputs(micro_batches):
    recorder = Recorder(micro_unet())
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(recorder.parameters(), lr=1e-3)
    prepared, optimizer = accelerator.prepare(recorder, optimizer)
    batches = [fixed_batch(input_perturbation=0.1) for _ in range(micro_batches)]
    for i, b in enumerate(batches):
        b.clean = b.clean.roll(i, 0)  # distinct micro-batches
    sam = SAMMode(SAM(recorder.named_parameters(), rho=0.1))
    stats = train_step(accelerator, prepared, optimizer, DDPMScheduler(), batches, sam=sam)
    first, second = recorder.calls[:micro_batches], recorder.calls[micro_batches:]
    assert len(second) == micro_batches
    for (x1, t1), (x2, t2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(t1, t2)
    assert stats.sharpness is not None and stats.sharpness != 0.0
