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
2. `quantize_for_deployment`: real int8 storage. Every Conv2d and Linear weight becomes an int8 per-output-channel
   `IntxUnpackedToInt8Tensor`, dequantized on the fly by torchao. `save_quantized` / `load_quantized` write and read
   such a model as safetensors (int8 codes and their scales) beside the UNet's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_flat.errors import FlatError
from diffusers_flat.run_directory import write_json

GRANULARITIES = ("per_tensor", "per_channel")
QUANTIZED_TYPES = (nn.Conv2d, nn.Linear)
QUANTIZED_WEIGHTS = "diffusion_pytorch_model.int8.safetensors"
QUANTIZATION_CONFIG = "quantization_config.json"


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
def quantize_for_deployment(model: nn.Module) -> nn.Module:
    """Give `model` real int8 weights, in place: every Conv2d and Linear weight becomes torchao's int8
    per-output-channel `IntxUnpackedToInt8Tensor`. Returns the model, in eval mode, for inference only."""
    model.eval().requires_grad_(False)
    for module in quantizable_layers(model).values():
        module.weight = nn.Parameter(per_channel_tensor(module.weight, 8), requires_grad=False)
    return model


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, int8 storage counted at one byte per weight."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        names = getattr(tensor, "tensor_data_names", None)  # torchao tensors hold their data in inner tensors
        parts = [getattr(tensor, n) for n in names] if names else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def save_quantized(model: UNet2DModel, directory: str | os.PathLike) -> None:
    """Write a `quantize_for_deployment` UNet as its config, safetensors (each quantized weight as its int8 codes,
    scales and zero points) and a quantization config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, quantized = {}, []
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "qdata"):  # a torchao IntxUnpackedToInt8Tensor
            tensors.update({f"{name}.{part}": getattr(tensor, part) for part in tensor.tensor_data_names})
            quantized.append(name)
        else:
            tensors[name] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / QUANTIZED_WEIGHTS)
    model.save_config(directory)
    write_json(
        directory / QUANTIZATION_CONFIG,
        {
            "method": "int8 weight-only, per output channel",
            "tensor": "torchao IntxUnpackedToInt8Tensor",
            "weights": quantized,
        },
    )


@torch.no_grad()
def load_quantized(directory: str | os.PathLike) -> UNet2DModel:
    """Read what `save_quantized` wrote; the model computes exactly what it did before saving."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    directory = Path(directory)
    if not (directory / QUANTIZED_WEIGHTS).is_file():
        raise QuantizationError(f"{directory}: no {QUANTIZED_WEIGHTS}; write one with save_quantized")
    quantized = json.loads((directory / QUANTIZATION_CONFIG).read_text())["weights"]
    model = UNet2DModel.from_config(UNet2DModel.load_config(directory)).eval().requires_grad_(False)
    tensors = load_file(directory / QUANTIZED_WEIGHTS)
    for name in quantized:
        qdata, scale, zero_point = (tensors.pop(f"{name}.{part}") for part in ("qdata", "scale", "zero_point"))
        weight = IntxUnpackedToInt8Tensor(
            qdata, scale, zero_point, torch.int8, (1, *qdata.shape[1:]), scale.dtype, None
        )
        model.get_submodule(name.rsplit(".", 1)[0]).weight = nn.Parameter(weight, requires_grad=False)
    missing = set(model.state_dict()) - set(tensors) - set(quantized)
    if missing:
        raise QuantizationError(f"{directory / QUANTIZED_WEIGHTS}: missing {', '.join(sorted(missing)[:5])}")
    model.load_state_dict(tensors, strict=False)
    return model
