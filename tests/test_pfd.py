"""The probability flow distance against closed forms: Gaussian data, whose exact denoiser and PF-ODE map are known,
and the metric's axioms."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.pfd import pfd
from diffusers_flat.sampling import flow_map

# A schedule that stops short of pure noise (abar_999 = 0.35), so the starting noise level matters to the closed form.
SCHEDULER = DDPMScheduler(beta_end=0.002, timestep_spacing="linspace")
STD = 0.5


class GaussianDenoiser(ModelMixin, ConfigMixin):
    """The exact epsilon of data N(m, s^2 I): x_t ~ N(a m, (a^2 s^2 + v) I), E[x0 | x_t] = m + a s^2 (x_t - a m) /
    (a^2 s^2 + v), epsilon = (x_t - a E[x0 | x_t]) / sqrt(v), with a^2 = abar_t and v = 1 - abar_t."""

    @register_to_config
    def __init__(self, mean: float, std: float = STD, sample_size: int = 4, in_channels: int = 1):
        super().__init__()
        self.register_buffer("abar", SCHEDULER.alphas_cumprod.double().clone())

    def forward(self, sample, timestep):
        abar = self.abar[int(timestep)]
        a, v, m, s = abar.sqrt(), 1 - abar, self.config.mean, self.config.std
        x = sample.double()
        x0 = m + a * s**2 * (x - a * m) / (a**2 * s**2 + v)
        return UNet2DOutput(sample=((x - a * x0) / v.sqrt()).float())


def closed_form_pfd(m1: float, m2: float, d: int, std: float = STD) -> float:
    """Phi(z) = m + s (z - a0 m) / sigma0 with sigma0^2 = a0^2 s^2 + v0 at the solver's first timestep t0 (999 with
    linspace spacing) and x_T = z: the exact flow keeps (x - a m) / sigma. So Phi_1(z) - Phi_2(z) = (m1 - m2)(1 - s a0
    / sigma0) in every pixel, for every z."""
    abar = SCHEDULER.alphas_cumprod[999].double()
    a0, v0 = abar.sqrt(), 1 - abar
    sigma0 = math.sqrt(a0**2 * std**2 + v0)
    return abs(m1 - m2) * math.sqrt(d) * abs(1 - std * float(a0) / sigma0)


@pytest.mark.parametrize(
    "solver, steps, tolerance", [("ddim", (5, 25, 200), 5e-3), ("dpm-solver++", (3, 8, 20), 5e-3)]
)
def test_pfd_of_two_gaussians_is_the_closed_form_and_the_solver_error_shrinks(solver, steps, tolerance):
    p, q = GaussianDenoiser(0.3), GaussianDenoiser(-0.2)
    exact = closed_form_pfd(0.3, -0.2, 16)
    assert abs(exact - 2.0) > 0.3  # not the naive ||m1 - m2||: the starting noise level counts
    errors = [abs(pfd(p, q, SCHEDULER.config, 8, s, solver, "identity", clamp=False)["pfd"] - exact) for s in steps]
    assert errors[0] > errors[1] > errors[2] and errors[2] < tolerance * exact, errors


def test_pfd_is_a_metric_with_shared_noise():
    a, b, c = GaussianDenoiser(0.3), GaussianDenoiser(-0.2), GaussianDenoiser(0.1, std=0.2)
    config = SCHEDULER.config
    assert pfd(a, a, config, 16, 10)["pfd"] == 0.0 and pfd(a, a, config, 16, 10)["stderr"] == 0.0
    ab, ba = pfd(a, b, config, 16, 10), pfd(b, a, config, 16, 10)
    assert ab["pfd"] == ba["pfd"] > 0
    ac, cb = pfd(a, c, config, 16, 10)["pfd"], pfd(c, b, config, 16, 10)["pfd"]
    assert ab["pfd"] <= ac + cb
    # c's map depends on z (a different std): the distances vary over z, and so the error is positive
    assert pfd(a, c, config, 16, 10)["stderr"] > 0


def test_images_are_clamped_to_the_data_range_and_how_far_the_flows_leave_it_is_reported():
    # N(4, 0.2^2) and N(5, 0.2^2): every pixel of every flow ends far above 1; N(0, 0.1^2) stays inside
    high, higher, inside = GaussianDenoiser(4.0, std=0.2), GaussianDenoiser(5.0, std=0.2), GaussianDenoiser(0.0, 0.1)
    ends = {
        name: flow_map(m, SCHEDULER.config, 8, 200).flatten(1).double()
        for name, m in [("high", high), ("higher", higher), ("inside", inside)]
    }
    assert (ends["high"] > 1).all() and (ends["inside"].abs() < 1).all()
    # by hand: the root mean square distance of each model's flows from 1, where every pixel is clamped
    above = {name: ((ends[name] - 1) ** 2).sum(1).mean().sqrt().item() for name in ("high", "higher")}
    clamped = pfd(high, higher, SCHEDULER.config, 8, 200)
    assert clamped["pfd"] == 0.0 and clamped["clamped"]
    assert clamped["outside"] == pytest.approx([above["high"], above["higher"]], rel=1e-6)
    raw = pfd(high, higher, SCHEDULER.config, 8, 200, descriptor="identity", clamp=False)
    assert raw["pfd"] == pytest.approx(closed_form_pfd(4.0, 5.0, 16, std=0.2), rel=5e-3)
    # against a model inside the range: every pixel of `high` is clamped to 1
    by_hand = ((1 - ends["inside"]) ** 2).sum(1).mean().sqrt().item()
    result = pfd(high, inside, SCHEDULER.config, 8, 200, descriptor="identity")
    assert result["pfd"] == pytest.approx(by_hand, rel=1e-6) and result["outside"][1] == 0.0


def test_the_pixels_descriptor_compares_images_scaled_to_unit_norm():
    a, c = GaussianDenoiser(0.3), GaussianDenoiser(0.1, std=0.2)
    ends = [flow_map(m, SCHEDULER.config, 8, 20).flatten(1).double().clamp(-1, 1) for m in (a, c)]
    unit = [e / torch.sqrt((e**2).sum(1, keepdim=True)) for e in ends]  # each image divided by its L2 norm
    by_hand = ((unit[0] - unit[1]) ** 2).sum(1).mean().sqrt().item()
    assert pfd(a, c, SCHEDULER.config, 8, 20)["pfd"] == pytest.approx(by_hand, rel=1e-9)
    assert pfd(a, c, SCHEDULER.config, 8, 20, descriptor="identity")["pfd"] != pytest.approx(by_hand, rel=1e-3)


def test_the_noise_is_shared_whatever_the_batch():
    model = GaussianDenoiser(0.1, std=0.3)
    assert torch.equal(flow_map(model, SCHEDULER.config, 7, 5, batch_size=3), flow_map(model, SCHEDULER.config, 7, 5))
    assert not torch.equal(*flow_map(model, SCHEDULER.config, 2, 5))  # and differs from image to image


def test_models_of_different_images_are_refused():
    with pytest.raises(FlatError, match="q: its images are 1x8x8, p's 1x4x4: PFD compares models of one shape") as err:
        pfd(GaussianDenoiser(0.0), GaussianDenoiser(0.0, sample_size=8), SCHEDULER.config, 4, 2)
    assert err.value.parameter == "q"
    with pytest.raises(FlatError, match="steps must divide the 1000 training timesteps for ddim"):
        pfd(GaussianDenoiser(0.0), GaussianDenoiser(0.0), SCHEDULER.config, 4, 30)
    with pytest.raises(FlatError, match="solver must be one of ddim, dpm-solver\\+\\+, got 'euler'"):
        pfd(GaussianDenoiser(0.0), GaussianDenoiser(0.0), SCHEDULER.config, 4, 2, solver="euler")
