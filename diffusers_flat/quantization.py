"""Weight quantization of a trained UNet, without fine-tuning, two ways.

1. `quantize_weights_`: the paper's direct post-training quantization (Table 4). Every Conv2d and Linear weight is
   scaled, clipped and rounded to a symmetric signed grid of `bits` bits, with one scale per tensor or per output
   channel, and written back in floating point ("fake" quantization). This measures robustness: the model computes
   exactly what a b-bit model would, at any b from 2 to 8.
2. `quantize_for_deployment`: real int8 storage. `nn.Linear` goes through torchao's `Int8WeightOnlyConfig`;
   torchao has no int8 convolution, so each `nn.Conv2d` becomes an `Int8Conv2d` that keeps its weight as int8 with a
   per-output-channel scale and dequantizes it on the fly. `save_quantized` / `load_quantized` write and read such a
   model as safetensors (int8 tensors and their scales) beside the UNet's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
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


def quantize_tensor(
    weight: torch.Tensor, bits: int, granularity: str = "per_tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of `weight` to `bits` bits: int8 codes in [-(2^(b-1)-1), 2^(b-1)-1] and the scale
    (one value, or one per output channel shaped to broadcast) such that `codes * scale` approximates `weight`."""
    check_bits(bits)
    check_granularity(granularity)
    qmax = 2 ** (bits - 1) - 1
    weight = weight.detach().float()
    if granularity == "per_tensor":
        absmax = weight.abs().amax()
    else:
        absmax = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True)
    # An all-zero tensor or channel gets scale 1 (its codes are 0 either way) instead of a division by zero.
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


class Int8Conv2d(nn.Module):
    """A Conv2d whose weight is stored as int8 codes with one float scale per output channel."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise QuantizationError(f"Int8Conv2d supports padding_mode 'zeros' only, got {conv.padding_mode!r}")
        codes, scale = quantize_tensor(conv.weight, 8, "per_channel")
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        out_channels, in_per_group, kh, kw = self.weight_int8.shape
        return f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, int8"


def _is_linear(module: nn.Module, _fqn: str) -> bool:
    return isinstance(module, nn.Linear)


@torch.no_grad()
def quantize_for_deployment(model: nn.Module) -> nn.Module:
    """Give `model` real int8 weights, in place: torchao int8 weight-only for every Linear, `Int8Conv2d` for every
    Conv2d. Returns the model, in eval mode, for inference only."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model.eval().requires_grad_(False)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_linear)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            model.set_submodule(name, Int8Conv2d(module))
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
    """Write a `quantize_for_deployment` UNet as its config, int8 safetensors and a quantization config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, linear = {}, []
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "qdata"):  # a torchao Int8Tensor: store its codes and scale
            tensors[f"{name}.qdata"], tensors[f"{name}.scale"] = tensor.qdata, tensor.scale
            linear.append(name)
        else:
            tensors[name] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / QUANTIZED_WEIGHTS)
    model.save_config(directory)
    write_json(
        directory / QUANTIZATION_CONFIG,
        {
            "method": "int8 weight-only",
            "conv": "Int8Conv2d per_channel",
            "linear": "torchao Int8WeightOnlyConfig",
            "torchao_linear": linear,
        },
    )


@torch.no_grad()
def load_quantized(directory: str | os.PathLike) -> UNet2DModel:
    """Read what `save_quantized` wrote; the model computes exactly what it did before saving."""
    from torchao.quantization import Int8Tensor

    directory = Path(directory)
    if not (directory / QUANTIZED_WEIGHTS).is_file():
        raise QuantizationError(f"{directory}: no {QUANTIZED_WEIGHTS}; write one with save_quantized")
    linear = json.loads((directory / QUANTIZATION_CONFIG).read_text())["torchao_linear"]
    model = quantize_for_deployment(UNet2DModel.from_config(UNet2DModel.load_config(directory)))
    tensors = load_file(directory / QUANTIZED_WEIGHTS)
    for name in linear:
        module_name = name.rsplit(".", 1)[0]
        layer = model.get_submodule(module_name)
        qdata, scale = tensors.pop(f"{name}.qdata"), tensors.pop(f"{name}.scale")
        weight = Int8Tensor(qdata, scale, block_size=[1, qdata.shape[1]], dtype=torch.float32)
        layer.weight = nn.Parameter(weight, requires_grad=False)
    model.load_state_dict(tensors, strict=False)
    missing = set(model.state_dict()) - set(tensors) - set(linear)
    if missing:
        raise QuantizationError(f"{directory / QUANTIZED_WEIGHTS}: missing {', '.join(sorted(missing)[:5])}")
    return model
