"""Size and CPU latency of an int8-deployed UNet against its fp32 original, measured in one run.

    python benchmarks/quantization.py [--model_path ddpm-flat-digits] [--preset ddpm-cifar10 --resolution 32]

Prints: bytes in memory (parameters and buffers) and on disk (safetensors) of fp32 and int8, as ratios (target:
int8 <= 30% of fp32); the median time of one UNet forward, fp32 and int8 timed alternately on the same batch, as a
ratio; and how far the int8 output is from fp32 (relative RMS).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from diffusers_flat.quantization import QUANTIZED_WEIGHTS, model_size_bytes, quantize_for_deployment, save_quantized
from diffusers_flat.training.models import PRESETS, build_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="A trained pipeline dir; without it, a fresh preset UNet.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    if args.model_path:
        fp32 = UNet2DModel.from_pretrained(args.model_path, subfolder="unet")
    else:
        fp32 = build_unet(args.preset, args.resolution, 3 if args.preset == "ddpm-cifar10" else 1)
    fp32.eval().requires_grad_(False)
    int8 = quantize_for_deployment(copy.deepcopy(fp32))
    config = fp32.config
    print(
        f"UNet: {sum(p.numel() for p in fp32.parameters()) / 1e6:.2f}M parameters, "
        f"{config.sample_size}x{config.sample_size}x{config.in_channels}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )

    memory = model_size_bytes(int8) / model_size_bytes(fp32)
    print(
        f"in memory: fp32 {model_size_bytes(fp32) / 2**20:.2f} MiB, int8 {model_size_bytes(int8) / 2**20:.2f} MiB, "
        f"int8/fp32 = {memory:.3f} (target <= 0.30)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        fp32.save_pretrained(Path(tmp) / "fp32")
        save_quantized(int8, Path(tmp) / "int8")
        disk32 = (Path(tmp) / "fp32" / "diffusion_pytorch_model.safetensors").stat().st_size
        disk8 = (Path(tmp) / "int8" / QUANTIZED_WEIGHTS).stat().st_size
    print(
        f"on disk: fp32 {disk32 / 2**20:.2f} MiB, int8 {disk8 / 2**20:.2f} MiB, "
        f"int8/fp32 = {disk8 / disk32:.3f} (target <= 0.30)"
    )

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    times = {"fp32": [], "int8": []}
    with torch.inference_mode():
        outputs = {name: model(x, t).sample for name, model in (("fp32", fp32), ("int8", int8))}  # warm-up
        for _ in range(args.repeats):
            for name, model in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                model(x, t)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"one UNet forward: fp32 {medians['fp32'] * 1e3:.1f} ms, int8 {medians['int8'] * 1e3:.1f} ms (medians of "
        f"{args.repeats}), int8/fp32 latency = {medians['int8'] / medians['fp32']:.3f}"
    )
    error = (outputs["int8"] - outputs["fp32"]).pow(2).mean().sqrt() / outputs["fp32"].pow(2).mean().sqrt()
    print(f"int8 output vs fp32: relative RMS difference {error:.4f}")


if __name__ == "__main__":
    main()
