"""LPF, the perturbation curve and the loss surface against closed forms on quadratic toy models."""

import numpy as np
import pytest
import torch

from diffusers_flat.flatness import loss_surface, loss_under_perturbation, lpf_flatness


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


def test_lpf_filter_normalized_matches_its_closed_form():
    # Filter-normalised noise on row i has variance sigma^2 ||w_i||^2 per element; the bias is not perturbed.
    model, sigma = toy(), 0.2
    result = lpf_flatness(model, quadratic_loss, sigma=sigma, num_draws=4000, show_progress=False)
    row_norms_sq = (model.weight.detach() ** 2).sum(dim=1, keepdim=True)
    expected = model.loss() + sigma**2 / 2 * (model.h_weight * row_norms_sq).sum().item()
    assert result["lpf"] == pytest.approx(expected, abs=4 * result["stderr"])


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
