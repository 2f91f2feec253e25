"""Weight quantization of a trained UNet, without fine-tuning, two ways.

1. `quantize_weights_`: the paper's direct post-training quantization (Table 4). Every Conv2d and Linear weight is
   scaled, clipped and rounded to a signed grid of `bits` bits and written back in floating point ("fake"
   quantization): the model computes exactly what a b-bit model would, at any b from 2 to 8. Two granularities, two
   conventions:
   - per_tensor (hand-written: torchao's Intx path has no per-tensor granularity): one scale absmax / (2^(b-1) - 1),
     codes in the symmetric range [-(2^(b-1) - 1), 2^(b-1) - 1], 2^b - 1 levels;
   - per_channel (torchao's `IntxUnpackedToInt8Tensor`, the tensor `IntxWeightOnlyConfig` builds): one scale per
     output channel, absmax / (2^(b-1) - 1/2), codes in torchao's range [-2^(b-1), 2^(b-1) - 1], 2^b levels. We pass
     the block size (1, C_in, kh, kw) ourselves: the config's PerAxis(0) gives a Conv2d one scale per output channel
     *and kernel position*, block (1, C_in, 1, 1), not one per output channel.
2. `quantize_for_deployment`: real low-bit storage. Every Conv2d and Linear weight becomes a per-output-channel
   `IntxUnpackedToInt8Tensor` with int8 (default) or int4 codes, dequantized on the fly by torchao: at 4 bits it
   computes exactly what `quantize_weights_(model, 4, "per_channel")` computes. `save_quantized` / `load_quantized`
   write and read such a model as safetensors beside the UNet's config: int8 codes one per byte, int4 codes packed
   two per byte (torchao keeps them unpacked in memory), with their scales. `load_quantized` also takes a Hub repo id.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_flat.errors import FlatError
from diffusers_flat.run_directory import write_atomically, write_json
from diffusers_flat.sampling import sample_images

GRANULARITIES = ("per_tensor", "per_channel")
QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)
DEPLOYMENT_BITS = (8, 4)
QUANTIZED_WEIGHTS = "diffusion_pytorch_model.int8.safetensors"
QUANTIZATION_CONFIG = "quantization_config.json"


def quantized_weights_file(bits: int) -> str:
    """The safetensors file `save_quantized` writes for `bits`-bit codes."""
    return f"diffusion_pytorch_model.int{bits}.safetensors"


class QuantizationError(FlatError):
    """Unsupported bits, granularity or model; the message names what is allowed."""


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"bits must be an integer from 2 to 8, got {bits!r}", "bits")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise QuantizationError(f"granularity {granularity!r}: choose {' or '.join(GRANULARITIES)}", "granularity")


def per_channel_tensor(weight: torch.Tensor, bits: int):
    """torchao's symmetric `bits`-bit quantization of `weight` with one scale per output channel (dim 0): an
    `IntxUnpackedToInt8Tensor` holding int8 codes in [-2^(b-1), 2^(b-1) - 1] and scales absmax / (2^(b-1) - 1/2)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quant_primitives import MappingType

    check_bits(bits)
    block_size = (1, *weight.shape[1:])  # one block per output channel
    return IntxUnpackedToInt8Tensor.from_hp(
        weight.detach(), block_size, getattr(torch, f"int{bits}"), mapping_type=MappingType.SYMMETRIC
    )


def quantize_tensor(
    weight: torch.Tensor, bits: int, granularity: str = "per_tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` on a `bits`-bit grid: int8 codes and the scale (one value, or one per output channel shaped to
    broadcast) such that `codes * scale` is the quantized weight. per_tensor: symmetric absmax, codes in
    [-(2^(b-1)-1), 2^(b-1)-1]; per_channel: torchao's symmetric mapping, codes in [-2^(b-1), 2^(b-1)-1]."""
    check_bits(bits)
    check_granularity(granularity)
    if granularity == "per_channel":
        quantized = per_channel_tensor(weight.float(), bits)
        return quantized.qdata, quantized.scale
    qmax = 2 ** (bits - 1) - 1
    weight = weight.detach().float()
    absmax = weight.abs().amax()
    # An all-zero tensor gets scale 1 (its codes are 0 either way) instead of a division by zero.
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    codes = torch.clamp(torch.round(weight / scale), -qmax, qmax).to(torch.int8)
    return codes, scale


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear of `model`, by qualified name: the layers both quantizers cover."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QUANTIZED_TYPES)}


@torch.no_grad()
def quantize_weights_(model: nn.Module, bits: int = 8, granularity: str = "per_tensor") -> list[str]:
    """Replace every Conv2d/Linear weight of `model`, in place, by its `bits`-bit quantized value (the paper's direct
    post-training quantization; biases and norms stay in floating point). Returns the names of the layers changed."""
    layers = quantizable_layers(model)
    for module in layers.values():
        codes, scale = quantize_tensor(module.weight, bits, granularity)
        module.weight.copy_(codes.float() * scale)
    return list(layers)


@torch.no_grad()
def quantize_for_deployment(model: nn.Module, bits: int = 8) -> nn.Module:
    """Give `model` real low-bit weights, in place: every Conv2d and Linear weight becomes torchao's per-output-channel
    `IntxUnpackedToInt8Tensor` with `bits`-bit codes (8 or 4). Returns the model, in eval mode, for inference only.

    Args:
        model: a UNet (or any module with Conv2d/Linear layers).
        bits: 8 (int8 codes) or 4 (int4 codes in [-8, 7], one scale absmax / 7.5 per output channel).

    Example:
        >>> model = quantize_for_deployment(torch.nn.Sequential(torch.nn.Linear(4, 2)), bits=4)
        >>> type(model[0].weight).__name__, int(model[0].weight.qdata.abs().max()) <= 8
        ('IntxUnpackedToInt8Tensor', True)
    """
    check_deployment_bits(bits)
    model.eval().requires_grad_(False)
    for module in quantizable_layers(model).values():
        module.weight = nn.Parameter(per_channel_tensor(module.weight, bits), requires_grad=False)
    return model


def check_deployment_bits(bits: int) -> None:
    if bits not in DEPLOYMENT_BITS:
        raise QuantizationError(f"bits must be 8 or 4 for deployment, got {bits!r}", "bits")


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, low-bit codes counted as `save_quantized` stores them:
    int8 one per byte, int4 two per byte."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        names = getattr(tensor, "tensor_data_names", None)  # torchao tensors hold their data in inner tensors
        if not names:
            total += tensor.numel() * tensor.element_size()
            continue
        bits = int(str(tensor.target_dtype).removeprefix("torch.int"))
        for name in names:
            part = getattr(tensor, name)
            total += -(-part.numel() * bits // 8) if name == "qdata" else part.numel() * part.element_size()
    return total


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], flattened and packed two per byte (the first in the low nibble), offset by 8 to
    [0, 15]; an odd count is padded with one zero nibble. Written by hand: torchao packs int4 only inside its
    kernels' own layouts, none of which this tensor uses.

    Example:
        >>> pack_int4(torch.tensor([-8, 7, 1], dtype=torch.int8)).tolist()
        [240, 9]
    """
    nibbles = (codes.flatten().to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, torch.zeros(1, dtype=torch.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The int8 codes of `shape` that `pack_int4` packed."""
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()
    count = math.prod(shape)
    return (nibbles[:count].to(torch.int16) - 8).to(torch.int8).reshape(shape)


def save_quantized(model: UNet2DModel, directory: str | os.PathLike) -> Path:
    """Write a `quantize_for_deployment` UNet as its config, safetensors (each quantized weight as its codes, int4
    packed two per byte, with scales and zero points) and a quantization config. Returns the weights file.

    Args:
        model: the quantized UNet.
        directory: where to write (created if needed); a Hub repo of these files loads with `load_quantized`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, quantized, bits = {}, [], None
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "qdata"):  # a torchao IntxUnpackedToInt8Tensor
            bits = int(str(tensor.target_dtype).removeprefix("torch.int"))  # torch.int4 -> 4
            parts = {part: getattr(tensor, part) for part in tensor.tensor_data_names}
            if bits == 4:
                parts["qdata"] = pack_int4(parts["qdata"])
            tensors.update({f"{name}.{part}": value for part, value in parts.items()})
            quantized.append({"name": name, "shape": list(tensor.qdata.shape)})
        else:
            tensors[name] = tensor
    if bits is None:
        raise QuantizationError("model: no quantized weights; quantize it with quantize_for_deployment", "model")
    path = directory / quantized_weights_file(bits)
    write_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    model.save_config(directory)
    packing = "two int4 codes per byte, low nibble first, offset by 8" if bits == 4 else "one int8 code per byte"
    write_json(
        directory / QUANTIZATION_CONFIG,
        {
            "method": f"int{bits} weight-only, per output channel",
            "tensor": "torchao IntxUnpackedToInt8Tensor",
            "bits": bits,
            "packing": packing,
            "weights": quantized,
        },
    )
    return path


@torch.no_grad()
def load_quantized(directory: str | os.PathLike) -> UNet2DModel:
    """Read what `save_quantized` wrote, from a local directory or a Hub repo id ("user/name"); the model computes
    exactly what it did before saving."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    directory = Path(directory)
    if not directory.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(directory)):  # a Hub repo id (user/name)
        from huggingface_hub import snapshot_download

        directory = Path(snapshot_download(str(directory), allow_patterns=["*.json", "*.safetensors"]))
    if not (directory / QUANTIZATION_CONFIG).is_file():
        raise QuantizationError(f"{directory}: no {QUANTIZATION_CONFIG}; write the model with save_quantized")
    config = json.loads((directory / QUANTIZATION_CONFIG).read_text())
    bits = config.get("bits", 8)  # written before int4 existed: int8
    weights = directory / quantized_weights_file(bits)
    if not weights.is_file():
        raise QuantizationError(f"{directory}: no {weights.name}; write the model with save_quantized")
    model = UNet2DModel.from_config(UNet2DModel.load_config(directory)).eval().requires_grad_(False)
    tensors = load_file(weights)
    quantized = [entry if isinstance(entry, dict) else {"name": entry} for entry in config["weights"]]
    for entry in quantized:
        name = entry["name"]
        qdata, scale, zero_point = (tensors.pop(f"{name}.{part}") for part in ("qdata", "scale", "zero_point"))
        if bits == 4:
            qdata = unpack_int4(qdata, tuple(entry["shape"]))
        weight = IntxUnpackedToInt8Tensor(
            qdata, scale, zero_point, getattr(torch, f"int{bits}"), (1, *qdata.shape[1:]), scale.dtype, None
        )
        model.get_submodule(name.rsplit(".", 1)[0]).weight = nn.Parameter(weight, requires_grad=False)
    missing = set(model.state_dict()) - set(tensors) - {entry["name"] for entry in quantized}
    if missing:
        raise QuantizationError(f"{weights}: missing {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(tensors, strict=False)
    return model


@torch.no_grad()
def deployment_check(
    unet: UNet2DModel, scheduler, bits: int, num_images: int, steps: int, sampler: str = "ddim", seed: int = 0
) -> dict:
    """Whether the real low-bit model, saved and reloaded, draws what the study measured: `num_images` samples from the
    same noises with `quantize_weights_(unet, bits, "per_channel")` and with `quantize_for_deployment(unet, bits)`
    written by `save_quantized` and read back by `load_quantized`. Identical samples give identical KID and FID.

    Args:
        unet: the fp32 UNet (not changed).
        scheduler: its noise scheduler.
        bits: 8 or 4.
        num_images: samples drawn by each.
        steps: the pipeline sampler's steps.
        sampler: "ddim" or "ddpm".
        seed: the noises' seed.

    Returns:
        {"identical": whether the 8-bit samples are equal pixel for pixel, "max_difference": the largest pixel
        difference (0-255), "num_images", "bits"}.
    """
    check_deployment_bits(bits)
    direct = copy.deepcopy(unet).eval()
    quantize_weights_(direct, bits, "per_channel")
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(quantize_for_deployment(copy.deepcopy(unet), bits), directory)
        reloaded = load_quantized(directory)
    a, b = (
        sample_images(model, scheduler, num_images, steps, seed, show_progress=False, sampler=sampler)
        for model in (direct, reloaded)
    )
    difference = int(abs(a.astype(int) - b.astype(int)).max())
    return {"identical": difference == 0, "max_difference": difference, "num_images": num_images, "bits": bits}
