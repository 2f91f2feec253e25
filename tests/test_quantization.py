"""Weight quantization: the direct (fake) quantizer against a hand-written reference, its error bound and coverage,
the int8 deployment path (sizes, torchao Linear, int8 conv storage) and its save/load round trip."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from helpers import MICRO_UNET
from torch import nn
from torchao.quantization import Int8Tensor

from diffusers_flat.quantization import (
    Int8Conv2d,
    QuantizationError,
    load_quantized,
    model_size_bytes,
    quantize_for_deployment,
    quantize_tensor,
    quantize_weights_,
    save_quantized,
)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **MICRO_UNET).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=generator), torch.tensor([0, 10, 100, 400, 700, 999])


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def test_codes_match_a_hand_written_reference():
    weight = torch.tensor([[0.45, -1.0, 0.26], [0.02, 0.0, -0.012]])
    codes, scale = quantize_tensor(weight, 4, "per_tensor")
    # 4 bits: codes in [-7, 7], scale = max|w| / 7 = 1/7; w * 7 = [3.15, -7, 1.82], [0.14, 0, -0.084]
    assert scale.item() == pytest.approx(1 / 7)
    assert codes.tolist() == [[3, -7, 2], [0, 0, 0]]
    codes, scale = quantize_tensor(weight, 4, "per_channel")
    assert scale.flatten().tolist() == pytest.approx([1 / 7, 0.02 / 7])
    # second row / (0.02 / 7) = [7, 0, -4.2]
    assert codes.tolist() == [[3, -7, 2], [7, 0, -4]]


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_error_at_most_half_a_step(bits, granularity):
    weight = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
    codes, scale = quantize_tensor(weight, bits, granularity)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax
    error = (codes.float() * scale - weight).abs()
    assert (error <= scale / 2 * (1 + 1e-6)).all()
    # The largest weight of each scale group lands exactly on the grid's end.
    dims = tuple(range(1, 4)) if granularity == "per_channel" else tuple(range(4))
    assert (codes.abs().amax(dim=dims) == qmax).all()


def test_every_conv_and_linear_weight_is_on_a_b_bit_grid(unet):
    model = copy.deepcopy(unet)
    expected = {name for name, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert len(expected) > 20
    changed = quantize_weights_(model, bits=4, granularity="per_tensor")
    assert set(changed) == expected
    for name in expected:
        weight = model.get_submodule(name).weight.detach()
        assert len(torch.unique(weight)) <= 15, name  # 4 bits: at most 2 * 7 + 1 levels
        step = unet.get_submodule(name).weight.abs().max() / 7
        levels = weight / step
        assert torch.allclose(levels, levels.round(), atol=1e-4), name
    # Biases and norms are untouched.
    for (name, before), after in zip(unet.named_parameters(), model.parameters()):
        if not name.endswith("weight") or name.rsplit(".", 1)[0] not in expected:
            assert torch.equal(before, after), name


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_8_bit_outputs_stay_close_and_4_bit_drift_further(unet, inputs, granularity):
    with torch.no_grad():
        reference = unet(*inputs).sample
        errors = {}
        for bits in (8, 6, 4):
            model = copy.deepcopy(unet)
            quantize_weights_(model, bits, granularity)
            errors[bits] = relative_rms(model(*inputs).sample, reference)
    assert errors[8] < 0.03
    assert errors[8] < errors[6] < errors[4]
    assert errors[4] > 4 * errors[8]


def test_deployment_stores_int8_and_is_at_most_30_percent(unet, inputs):
    model = quantize_for_deployment(copy.deepcopy(unet))
    convs = [name for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [name for name, m in unet.named_modules() if isinstance(m, nn.Linear)]
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    for name in convs:
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8Conv2d) and layer.weight_int8.dtype == torch.int8, name
    for name in linears:
        assert isinstance(model.get_submodule(name).weight, Int8Tensor), name
        assert model.get_submodule(name).weight.qdata.dtype == torch.int8
    fp32_bytes = sum(t.numel() * 4 for t in unet.state_dict().values())
    assert model_size_bytes(unet) == fp32_bytes
    assert model_size_bytes(model) <= 0.30 * fp32_bytes
    with torch.no_grad():
        assert relative_rms(model(*inputs).sample, unet(*inputs).sample) < 0.03


def test_int8_conv_matches_per_channel_fake_quantization(unet, inputs):
    """Int8Conv2d computes what the fp32 conv does with per-channel 8-bit weights."""
    conv = unet.conv_in
    fake = copy.deepcopy(conv)
    quantize_weights_(fake, 8, "per_channel")
    x = inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(Int8Conv2d(conv)(x), fake(x), rtol=1e-5, atol=1e-6)


def test_save_and_load_give_identical_outputs(unet, inputs, tmp_path):
    model = quantize_for_deployment(copy.deepcopy(unet))
    with torch.no_grad():
        before = model(*inputs).sample
    save_quantized(model, tmp_path / "int8")
    loaded = load_quantized(tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).sample, before)
    config = json.loads((tmp_path / "int8" / "quantization_config.json").read_text())
    assert len(config["torchao_linear"]) == sum(isinstance(m, nn.Linear) for m in unet.modules())
    # On disk the weights take what they take in memory: int8 codes at one byte each (plus the file's header).
    on_disk = tensor_bytes(tmp_path / "int8" / "diffusion_pytorch_model.int8.safetensors")
    assert on_disk == model_size_bytes(model)
    unet.save_pretrained(tmp_path / "fp32")
    assert on_disk <= 0.30 * tensor_bytes(tmp_path / "fp32" / "diffusion_pytorch_model.safetensors")


def tensor_bytes(path) -> int:
    """The data section of a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header_length


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantize_tensor(torch.ones(2), 9), "bits must be an integer from 2 to 8, got 9"),
        (lambda: quantize_tensor(torch.ones(2), 8, "per_row"), "granularity 'per_row': choose per_tensor or"),
        (lambda: load_quantized("/nonexistent"), "no diffusion_pytorch_model.int8.safetensors"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(QuantizationError, match=message):
        call()


def test_zero_weights_quantize_to_zero():
    codes, scale = quantize_tensor(torch.zeros(3, 4), 8, "per_channel")
    assert codes.abs().sum() == 0 and np.isfinite(scale.numpy()).all()
