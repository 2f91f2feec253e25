"""The quantization ladder: the levels each bit width and granularity leaves (counted), the sensitivity curve of a
model already on a grid (zero where the grids nest), the deterministic displacement (zero for identical weights,
growing continuously with a weight change), and the metric through `evaluate`."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.evaluate import evaluate
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.settings import EvaluationSettings, evaluation_work
from diffusers_flat.metrics.flatness import DiffusionLoss
from diffusers_flat.metrics.quantization_sensitivity import displacement, quantization_sensitivity
from diffusers_flat.quantization import quantize_weights_
from diffusers_flat.run_directory import DataSource


@pytest.fixture
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **MICRO_UNET)
    with torch.no_grad():  # a model that is not at its initialisation: the output layer is zero there
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def quantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


@pytest.mark.parametrize("bits", [5, 3])
def test_each_bit_width_leaves_its_number_of_levels_per_tensor_or_channel(bits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3), torch.nn.Linear(40, 5))
    per_tensor = copy.deepcopy(model)
    quantize_weights_(per_tensor, bits, "per_tensor")
    symmetric = 2 * (2 ** (bits - 1) - 1) + 1  # ours: -(2^(b-1) - 1) .. 2^(b-1) - 1
    for name, w in quantized_weights(per_tensor).items():
        assert len(torch.unique(w)) == symmetric, name  # every level used: a Gaussian tensor of 200+ weights
    per_channel = copy.deepcopy(model)
    quantize_weights_(per_channel, bits, "per_channel")
    for name, w in quantized_weights(per_channel).items():
        original = dict(model.named_modules())[name].weight.detach().flatten(1)
        for channel, weights in zip(w.flatten(1), original):
            # torchao's grid: k * absmax / (2^(b-1) - 1/2) for k in -2^(b-1) .. 2^(b-1) - 1, at most 2^b levels
            steps = channel / (weights.abs().max() / (2 ** (bits - 1) - 0.5))
            torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
            assert steps.round().min() >= -(2 ** (bits - 1)) and steps.round().max() <= 2 ** (bits - 1) - 1, name
            assert len(torch.unique(channel)) <= 2**bits, name
        assert len(torch.unique(w)) > 2**bits, name  # each channel on a grid of its own


def test_a_model_on_a_4_bit_grid_is_unchanged_where_the_grids_nest(unet):
    """Quantizing to b bits keeps a weight on the 4-bit grid k m / 7 (up to float rounding) when (2^(b-1) - 1) is a
    multiple of 7 (b = 4 and 7); at 5, 6 and 8 bits it moves each weight by at most half a b-bit step,
    m / (2 (2^(b-1) - 1)): grids of symmetric absmax scales nest only there."""
    quantize_weights_(unet, 4, "per_tensor")
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    loss = DiffusionLoss(DDPMScheduler(), images, seed=0, batch_size=32)
    curve = quantization_sensitivity(unet, DDPMScheduler(), loss, (8, 7, 6, 5, 4), ("per_tensor",), 4, 4)["curves"]
    for bits in ("4", "7"):  # the same grid: the weights move by float rounding only
        point = curve["per_tensor"][bits]
        assert abs(point["loss_increase"]) < 1e-6 and point["ancestral_displacement"] < 1e-3, bits
        assert point["ddim_displacement"] < 1e-3 * curve["per_tensor"]["5"]["ddim_displacement"], bits
    grid = quantized_weights(unet)
    for bits in (5, 6, 8):
        again = copy.deepcopy(unet)
        quantize_weights_(again, bits, "per_tensor")
        for name, w in quantized_weights(again).items():
            step = grid[name].abs().max() / (2 ** (bits - 1) - 1)
            assert (w - grid[name]).abs().max() <= step / 2 + 1e-7, (name, bits)


def test_the_ddim_pipeline_displacement_is_zero_for_the_same_weights_and_grows_continuously(unet):
    scheduler = DDPMScheduler()
    assert displacement(unet, copy.deepcopy(unet), scheduler, num_samples=4, steps=10) == 0.0
    torch.manual_seed(1)
    direction = [torch.randn_like(p) for p in unet.parameters()]
    moved = []
    for epsilon in (1e-5, 1e-4, 1e-3, 1e-2):
        perturbed = copy.deepcopy(unet)
        with torch.no_grad():
            for p, d in zip(perturbed.parameters(), direction):
                p.add_(epsilon * d)
        moved.append(displacement(unet, perturbed, scheduler, num_samples=4, steps=10))
    assert 0 < moved[0] < moved[1] < moved[2] < moved[3]
    assert moved[0] < 0.05 * moved[2]  # continuous: a hundred times smaller a change moves the samples far less


def test_the_sensitivity_metric_through_evaluate(unet):
    real = load_real_images(DataSource(), 8, 1)
    settings = EvaluationSettings(
        metrics=("sensitivity",), ladder=(8, 3), ladder_samples=4, ladder_steps=10, loss_samples=16, batch_size=16
    )
    # its cost, counted by hand: the fp32 model and 2 x 2 quantized copies, each the 16 loss terms and 4 samples
    # x 10 steps x (the DDIM pipeline, the PF-ODE, the DDPM pipeline)
    assert evaluation_work(settings) == (5 * (16 + 4 * 10 * 3), 0)
    with_ddpm = EvaluationSettings(**{**settings.__dict__, "ladder_sampler": "ddpm"})
    assert evaluation_work(with_ddpm) == (5 * (16 + 4 * 10 * 2), 0)  # its samples are the ancestral ones
    result = evaluate(unet, DDPMScheduler(), real, settings).result["sensitivity"]
    assert set(result["curves"]) == {"per_tensor", "per_channel"} and result["num_samples"] == 4
    assert result["sampler"] == "ddim"
    for curve in result["curves"].values():
        assert set(curve) == {"8", "3"}
        for measure in ("displacement", "ddim_displacement"):
            assert 0 < curve["8"][measure] < curve["3"][measure]  # fewer bits move more
    with pytest.raises(FlatError, match="ladder: the sensitivity metric needs bits"):
        EvaluationSettings(metrics=("sensitivity",), ladder=())
    with pytest.raises(FlatError, match="ladder_granularities granularity 'per_row'"):
        EvaluationSettings(metrics=("sensitivity",), ladder_granularities=("per_row",))
