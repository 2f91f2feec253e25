"""LPF, the perturbation curve and the loss surface against closed forms on quadratic toy models."""

import numpy as np
import pytest
import torch

from diffusers_flat.metrics.flatness import loss_surface, loss_under_perturbation, lpf_flatness


class Quadratic(torch.nn.Module):
    """L(w) = 1/2 (w - w*)^T H (w - w*) + c with a diagonal H, on a weight matrix and a bias."""

    def __init__(self, curvature: torch.Tensor, bias_curvature: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(curvature.shape))
        self.bias = torch.nn.Parameter(torch.randn(bias_curvature.shape))
        self.h_weight, self.h_bias = curvature, bias_curvature
        self.optimum = torch.randn(curvature.shape)

    @torch.no_grad()
    def loss(self) -> float:
        dw = self.weight - self.optimum
        return (0.5 * (self.h_weight * dw**2).sum() + 0.5 * (self.h_bias * self.bias**2).sum() + 1.0).item()


def quadratic_loss(model) -> float:
    return model.loss()


def toy(scale: float = 1.0) -> Quadratic:
    return Quadratic(scale * torch.linspace(0.5, 3.0, 24).view(4, 6), torch.tensor([2.0, 1.0, 0.5, 4.0]))


def test_lpf_isotropic_matches_half_sigma_squared_trace():
    model, sigma = toy(), 0.3
    result = lpf_flatness(
        model, quadratic_loss, sigma=sigma, num_draws=4000, filter_normalized=False, show_progress=False
    )
    trace = model.h_weight.sum().item() + model.h_bias.sum().item()
    expected = model.loss() + sigma**2 / 2 * trace
    assert result["lpf"] == pytest.approx(expected, abs=4 * result["stderr"])
    assert result["num_draws"] == 4000 and result["stderr"] > 0


def test_lpf_leaves_frozen_parameters_alone():
    # the bias frozen (as the zeroed time embedding of a noise-unconditional UNet): only the weight's curvature counts
    model, sigma = toy(), 0.3
    model.h_bias = torch.full((4,), 40.0)  # a steep bias: perturbing it would show far beyond the error
    model.bias.requires_grad_(False)
    bias = model.bias.detach().clone()
    result = lpf_flatness(
        model, quadratic_loss, sigma=sigma, num_draws=4000, filter_normalized=False, show_progress=False
    )
    expected = model.loss() + sigma**2 / 2 * model.h_weight.sum().item()
    assert result["lpf"] == pytest.approx(expected, abs=4 * result["stderr"])
    with_bias = expected + sigma**2 / 2 * model.h_bias.sum().item()  # what perturbing the bias too would give
    assert abs(result["lpf"] - with_bias) > 8 * result["stderr"]
    assert torch.equal(model.bias, bias)


def test_lpf_filter_normalized_matches_its_closed_form():
    # Bisla et al.: filter i (row i of the weight and bias i) is divided by s_i = ||w_i|| + |b_i| and then perturbed by
    # N(0, sigma^2) per element; on the trained scale that is variance sigma^2 s_i^2 on the row and on its bias.
    model, sigma = toy(), 0.2
    result = lpf_flatness(model, quadratic_loss, sigma=sigma, num_draws=4000, show_progress=False)
    w, b = model.weight.detach(), model.bias.detach()
    s_sq = (w.pow(2).sum(dim=1).sqrt() + b.abs()) ** 2
    expected = model.loss() + sigma**2 / 2 * ((model.h_weight * s_sq[:, None]).sum() + (model.h_bias * s_sq).sum())
    assert result["lpf"] == pytest.approx(expected.item(), abs=4 * result["stderr"])
    assert result["num_draws"] == 4000


class ScaleInvariant(torch.nn.Module):
    """Conv filters each followed by a per-channel normalisation (GroupNorm with one channel per group), as the
    BatchNorm after every conv of Bisla et al.'s networks: rescaling a filter and its bias does not change the
    output (up to GroupNorm's eps, made negligible here)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.norm1 = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.GroupNorm(4, 4, eps=1e-12)
        self.conv2, self.norm2 = torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.GroupNorm(3, 3, eps=1e-12)
        self.inputs, self.targets = torch.randn(5, 2, 6, 6).double(), torch.randn(5, 3, 6, 6).double()
        self.double()

    @torch.no_grad()
    def loss(self) -> float:
        out = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(self.inputs)))))
        return torch.nn.functional.mse_loss(out, self.targets).item()


def test_lpf_equals_normalise_then_perturb_where_normalisation_is_invisible():
    # Their procedure, written out: divide every conv filter and its bias by ||w_f|| + |b_f|, then add
    # N(0, sigma^2) to every parameter (GroupNorm's too), drawing the noise in parameter order as ours does.
    model, sigma, draws = ScaleInvariant(), 0.05, 6
    reference, generator = [], torch.Generator().manual_seed(3)
    for _ in range(draws):
        copy_ = ScaleInvariant()
        copy_.load_state_dict(model.state_dict())
        with torch.no_grad():
            for conv in (copy_.conv1, copy_.conv2):
                scale = conv.weight.flatten(1).norm(dim=1) + conv.bias.abs()
                conv.weight /= scale.view(-1, 1, 1, 1)
                conv.bias /= scale
            for p in copy_.parameters():
                p += sigma * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        reference.append(copy_.loss())
    ours = lpf_flatness(model, lambda m: m.loss(), sigma=sigma, num_draws=draws, seed=3, show_progress=False)
    assert ours["lpf"] == pytest.approx(float(np.mean(reference)), rel=1e-9)
    assert ours["lpf"] > model.loss()


def test_lpf_with_zero_sigma_is_the_loss_and_weights_are_restored():
    model = toy()
    before = [p.detach().clone() for p in model.parameters()]
    assert lpf_flatness(model, quadratic_loss, sigma=0.0, num_draws=3, show_progress=False)["lpf"] == model.loss()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_perturbation_curve_starts_at_the_loss_and_is_steeper_for_sharper_models():
    gammas = [0.0, 0.5, 1.0, 2.0]
    flat = loss_under_perturbation(toy(1.0), quadratic_loss, gammas, num_directions=10, show_progress=False)
    sharp = loss_under_perturbation(toy(5.0), quadratic_loss, gammas, num_directions=10, show_progress=False)
    assert flat["loss"][0] == toy(1.0).loss() and sharp["loss"][0] == toy(5.0).loss()
    rise = lambda curve: np.asarray(curve["loss"]) - curve["loss"][0]  # noqa: E731
    assert (rise(sharp)[1:] > rise(flat)[1:]).all()
    # For a quadratic, the rise at gamma is quadratic in gamma when averaged over the same directions.
    np.testing.assert_allclose(rise(flat)[3] / rise(flat)[2], 4.0, rtol=0.35)


def test_loss_surface_centre_is_the_loss():
    model = toy()
    surface = loss_surface(model, quadratic_loss, extent=0.5, resolution=5, show_progress=False)
    grid = np.asarray(surface["loss"])
    assert grid.shape == (5, 5) and grid[2, 2] == pytest.approx(model.loss())
    assert grid.max() > grid[2, 2]
