"""Weight quantization: the direct (fake) quantizer against hand-written references (our symmetric per-tensor grid,
torchao's per-channel mapping), its error bound and coverage, the int8 and int4 deployment paths (sizes, torchao
tensors on every Conv2d and Linear, int4 codes packed two per byte) and their save/load round trips, also by Hub id."""

import copy
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_command
from diffusers import DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET, unbiased_mmd
from torch import nn
from torchao.quantization import IntxUnpackedToInt8Tensor

from diffusers_flat.quantization import (
    QuantizationError,
    deployment_check,
    load_quantized,
    model_size_bytes,
    pack_int4,
    quantize_for_deployment,
    quantize_tensor,
    quantize_weights_,
    save_quantized,
)
from diffusers_flat.sampling import sample_images


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
    weight = torch.tensor([[1.0, -0.45, 0.26], [0.02, 0.0, -0.011]])
    codes, scale = quantize_tensor(weight, 4, "per_tensor")
    # Ours, per tensor: codes in [-7, 7], scale = max|w| / 7 = 1/7; w * 7 = [7, -3.15, 1.82], [0.14, 0, -0.077]
    assert scale.item() == pytest.approx(1 / 7)
    assert codes.tolist() == [[7, -3, 2], [0, 0, 0]]
    codes, scale = quantize_tensor(weight, 4, "per_channel")
    # torchao's, per output channel: codes in [-8, 7], scale = max|w| / 7.5; row 1 * 7.5 = [7.5, -3.375, 1.95],
    # row 2 / (0.02 / 7.5) = [7.5, 0, -4.125]; 7.5 rounds to 7 or 8 and 8 clips to 7.
    assert scale.flatten().tolist() == pytest.approx([1 / 7.5, 0.02 / 7.5])
    assert codes.tolist() == [[7, -3, 2], [7, 0, -4]]


def torchao_reference(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """torchao's symmetric mapping written out: scale = absmax / ((qmax - qmin) / 2) per output channel, codes
    round(w * (1 / scale)) clipped to [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True) / ((qmax - qmin) / 2)
    return torch.clamp(torch.round(weight * (1.0 / scale)), qmin, qmax) * scale


@pytest.mark.parametrize("bits", [8, 5, 3])
def test_per_channel_is_torchaos_mapping_and_per_tensor_ours(bits):
    torch.manual_seed(bits)
    weight = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
    codes, scale = quantize_tensor(weight, bits, "per_channel")
    torch.testing.assert_close(codes.float() * scale, torchao_reference(weight, bits), rtol=0, atol=0)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    qmax = 2 ** (bits - 1) - 1
    codes, scale = quantize_tensor(weight, bits, "per_tensor")
    hand = torch.clamp(torch.round(weight / (weight.abs().max() / qmax)), -qmax, qmax)
    assert torch.equal(codes.float(), hand) and codes.abs().max() == qmax


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_error_at_most_half_a_step(bits, granularity):
    torch.manual_seed(bits)
    weight = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 0, 16).view(-1, 1, 1, 1)
    codes, scale = quantize_tensor(weight, bits, granularity)
    assert codes.dtype == torch.int8
    error = (codes.float() * scale - weight).abs()
    assert (error <= scale / 2 * (1 + 1e-4)).all()  # half a step, up to float32 rounding of w * (1 / scale)
    # The largest weight of each scale group lands on the grid's end (torchao's at +-(2^(b-1) - 1/2) steps: the
    # negative end rounds to -2^(b-1), the positive one clips to 2^(b-1) - 1).
    dims = tuple(range(1, 4)) if granularity == "per_channel" else tuple(range(4))
    top = codes.float().abs().amax(dim=dims)  # in float: abs(-128) overflows int8
    assert (top == 2 ** (bits - 1) - 1).all() if granularity == "per_tensor" else (top >= 2 ** (bits - 1) - 1).all()


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
    layers = [name for name, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name in layers:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, IntxUnpackedToInt8Tensor) and weight.qdata.dtype == torch.int8, name
        # One scale per output channel, as the per-channel fake quantization has it.
        assert weight.scale.numel() == weight.shape[0], name
        torch.testing.assert_close(weight.dequantize(), torchao_reference(unet.get_submodule(name).weight, 8))
    fp32_bytes = sum(t.numel() * 4 for t in unet.state_dict().values())
    assert model_size_bytes(unet) == fp32_bytes
    assert model_size_bytes(model) <= 0.30 * fp32_bytes
    with torch.no_grad():
        assert relative_rms(model(*inputs).sample, unet(*inputs).sample) < 0.03


def test_int8_deployment_matches_per_channel_fake_quantization(unet, inputs):
    """The int8 model computes what the fp32 model does with per-channel 8-bit weights."""
    fake = copy.deepcopy(unet)
    quantize_weights_(fake, 8, "per_channel")
    with torch.no_grad():
        torch.testing.assert_close(
            quantize_for_deployment(copy.deepcopy(unet))(*inputs).sample, fake(*inputs).sample, rtol=1e-5, atol=1e-5
        )


def test_save_and_load_give_identical_outputs(unet, inputs, tmp_path):
    model = quantize_for_deployment(copy.deepcopy(unet))
    with torch.no_grad():
        before = model(*inputs).sample
    save_quantized(model, tmp_path / "int8")
    loaded = load_quantized(tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).sample, before)
    config = json.loads((tmp_path / "int8" / "quantization_config.json").read_text())
    assert len(config["weights"]) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())
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
        (lambda: load_quantized("/nonexistent"), "no quantization_config.json"),
        (lambda: quantize_for_deployment(nn.Linear(2, 2), bits=6), "bits must be 8 or 4 for deployment, got 6"),
        (lambda: save_quantized(nn.Linear(2, 2), "/tmp/never"), "model: no quantized weights"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(QuantizationError, match=message):
        call()


def test_zero_weights_quantize_to_zero():
    codes, scale = quantize_tensor(torch.zeros(3, 4), 8, "per_channel")
    assert codes.abs().sum() == 0 and np.isfinite(scale.numpy()).all()


def test_int4_codes_pack_two_per_byte_low_nibble_first():
    codes = torch.tensor([-8, 7, 0, -1, 3], dtype=torch.int8)
    # offset by 8: 0, 15, 8, 7, 11 (and a zero pad); bytes low | high << 4: 0 | 240, 8 | 112, 11 | 0
    assert pack_int4(codes).tolist() == [240, 120, 11]


def test_int4_deployment_is_the_direct_4_bit_per_channel_model(unet, inputs):
    model = quantize_for_deployment(copy.deepcopy(unet), bits=4)
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = model.get_submodule(name).weight
            assert isinstance(weight, IntxUnpackedToInt8Tensor) and weight.target_dtype == torch.int4, name
            assert weight.qdata.min() >= -8 and weight.qdata.max() <= 7 and weight.scale.numel() == weight.shape[0]
            torch.testing.assert_close(weight.dequantize(), torchao_reference(module.weight, 4))
    fake = copy.deepcopy(unet)
    quantize_weights_(fake, 4, "per_channel")
    with torch.no_grad():
        assert torch.equal(model(*inputs).sample, fake(*inputs).sample)


SHIPPED = REPO / "spaces_app" / "models" / "fashion-mnist-sam-rho0.01-seed1"


@pytest.fixture(scope="module")
def saved_int4(tmp_path_factory):
    """The shipped flat model (1.1M parameters) at int4, saved."""
    unet = UNet2DModel.from_pretrained(SHIPPED, subfolder="unet").eval()
    model = quantize_for_deployment(copy.deepcopy(unet), bits=4)
    path = tmp_path_factory.mktemp("int4")
    save_quantized(model, path)
    return unet, model, path


def test_int4_save_and_load_are_bit_identical_at_under_a_sixth_of_fp32(saved_int4):
    unet, model, path = saved_int4
    inputs = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 50, 500, 999])
    loaded = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs).sample, model(*inputs).sample)
    config = json.loads((path / "quantization_config.json").read_text())
    assert config["bits"] == 4 and not (path / "diffusion_pytorch_model.int8.safetensors").exists()
    # by hand: half a byte per code (rounded up per tensor), a float32 scale and an int8 zero point per output
    # channel, and every other tensor at float32
    layers = {f"{n}.weight": m.weight for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    expected = sum(-(-w.numel() // 2) + 4 * w.shape[0] + w.shape[0] for w in layers.values())
    expected += sum(4 * t.numel() for n, t in unet.state_dict().items() if n not in layers)
    on_disk = tensor_bytes(path / "diffusion_pytorch_model.int4.safetensors")
    assert on_disk == expected == model_size_bytes(model)
    ratio = on_disk / tensor_bytes(SHIPPED / "unet" / "diffusion_pytorch_model.safetensors")
    print(f"int4 weights on disk: {ratio:.3f} of fp32")
    assert ratio <= 0.16


UPLOAD = """
import sys
from pathlib import Path
from huggingface_hub import CommitOperationAdd, HfApi
files = [CommitOperationAdd(p.name, str(p)) for p in Path(sys.argv[1]).iterdir()]
HfApi(token="hf_test").create_commit("someone/flat-int4", files, commit_message="int4")
"""
LOAD = """
import sys, torch
from diffusers_flat.quantization import load_quantized
model = load_quantized("someone/flat-int4")
x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
with torch.no_grad():
    torch.save(model(x, t).sample, sys.argv[1])
"""


@pytest.mark.slow
def test_an_int4_model_pushed_to_the_hub_loads_by_repo_id(saved_int4, tmp_path):
    """Pushed through the intercepted Hub (the upload recorded, not sent), laid out as huggingface_hub's cache holds a
    downloaded repo, and loaded by id offline in a fresh process: the same outputs."""
    _, model, path = saved_int4
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests" / "hub_intercept"), HUB_INTERCEPT_LOG=str(log))
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # nothing real answers there
    result = run_command([sys.executable, "-c", UPLOAD, str(path)], tmp_path, 300, env)
    assert result.returncode == 0, result.stderr[-2000:]
    [commit] = [call for call in map(json.loads, log.read_text().splitlines()) if call["call"] == "create_commit"]
    assert set(commit["files"]) == {
        "config.json",
        "quantization_config.json",
        "diffusion_pytorch_model.int4.safetensors",
    }
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--someone--flat-int4"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    for name, entry in commit["files"].items():
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(entry["source"], repo / "snapshots" / revision / name)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = run_command([sys.executable, "-c", LOAD, str(tmp_path / "out.pt")], tmp_path, 300, env)
    assert result.returncode == 0, result.stderr[-2000:]
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(x, t).sample)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_deployed_model_saved_and_reloaded_draws_the_samples_the_study_measured(unet, bits, tmp_path):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    check = deployment_check(unet, scheduler, bits, num_images=6, steps=5)
    assert check == {"identical": True, "max_difference": 0, "num_images": 6, "bits": bits}
    # the same samples, by hand: the direct model's and the reloaded int-b model's, with their KID against the same
    # reference set (the unbiased MMD^2 written out in helpers); and not the fp32 model's samples
    direct = copy.deepcopy(unet)
    quantize_weights_(direct, bits, "per_channel")
    saved = save_quantized(quantize_for_deployment(copy.deepcopy(unet), bits), tmp_path)
    reloaded = load_quantized(saved.parent)
    a, b, fp32 = (
        sample_images(m, scheduler, 6, 5, 0, show_progress=False, sampler="ddim") for m in (direct, reloaded, unet)
    )
    reference = np.random.default_rng(0).uniform(0, 1, (6, 16))
    features = [x.reshape(6, -1)[:, :16].astype(float) / 255 for x in (a, b)]
    assert np.array_equal(a, b) and unbiased_mmd(features[0], reference) == unbiased_mmd(features[1], reference)
    assert bits == 8 or not np.array_equal(a, fp32)
