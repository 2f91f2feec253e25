"""Size and CPU latency of int8- and int4-deployed UNets against their fp32 originals, measured in one run.

    python benchmarks/quantization.py                                  # the shipped flat and sharp pair
    python benchmarks/quantization.py --model_path ddpm-flat-digits    # or any pipelines
    python benchmarks/quantization.py --preset ddpm-cifar10 --resolution 32   # a fresh preset UNet

Prints, for each model: bytes in memory (parameters and buffers, low-bit codes at their stored width) and on disk
(safetensors) of fp32, int8 and int4, as ratios to fp32 (targets: int8 <= 0.30, int4 <= 0.16); the median time of
one UNet forward, fp32, int8 and int4 timed in turn on the same batch, as ratios; and how far each low-bit output is
from fp32 (relative RMS).
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

from diffusers_flat.quantization import model_size_bytes, quantize_for_deployment, save_quantized
from diffusers_flat.training.models import PRESETS, build_unet

SHIPPED = sorted(str(p) for p in (Path(__file__).resolve().parent.parent / "spaces_app" / "models").glob("*/unet"))
TARGETS = {"int8": 0.30, "int4": 0.16}


def benchmark(fp32: UNet2DModel, batch_size: int, repeats: int) -> None:
    fp32.eval().requires_grad_(False)
    models = {"fp32": fp32, "int8": quantize_for_deployment(copy.deepcopy(fp32), 8)}
    models["int4"] = quantize_for_deployment(copy.deepcopy(fp32), 4)
    config = fp32.config
    print(
        f"UNet: {sum(p.numel() for p in fp32.parameters()) / 1e6:.2f}M parameters, "
        f"{config.sample_size}x{config.sample_size}x{config.in_channels}, batch {batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    memory = {name: model_size_bytes(model) for name, model in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        fp32.save_pretrained(Path(tmp) / "fp32")
        disk = {"fp32": (Path(tmp) / "fp32" / "diffusion_pytorch_model.safetensors").stat().st_size}
        for name in ("int8", "int4"):
            disk[name] = save_quantized(models[name], Path(tmp) / name).stat().st_size
    for what, sizes in (("in memory", memory), ("on disk", disk)):
        cells = [f"{name} {size / 2**20:.2f} MiB" for name, size in sizes.items()]
        ratios = [f"{name}/fp32 = {sizes[name] / sizes['fp32']:.3f} (target <= {TARGETS[name]})" for name in TARGETS]
        print(f"{what}: {', '.join(cells)}; {', '.join(ratios)}")

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.randint(0, 1000, (batch_size,), generator=generator)
    times = {name: [] for name in models}
    with torch.inference_mode():
        outputs = {name: model(x, t).sample for name, model in models.items()}  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x, t)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = ", ".join(f"{name}/fp32 latency = {medians[name] / medians['fp32']:.3f}" for name in TARGETS)
    cells = ", ".join(f"{name} {median * 1e3:.1f} ms" for name, median in medians.items())
    print(f"one UNet forward: {cells} (medians of {repeats}); {ratios}")
    for name in TARGETS:
        error = (outputs[name] - outputs["fp32"]).pow(2).mean().sqrt() / outputs["fp32"].pow(2).mean().sqrt()
        print(f"{name} output vs fp32: relative RMS difference {error:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_path", nargs="+", default=None, help="Trained pipeline dirs (default: the shipped flat/sharp pair)."
    )
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="A fresh preset UNet instead.")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.preset:
        channels = 3 if args.preset == "ddpm-cifar10" else 1
        benchmark(build_unet(args.preset, args.resolution, channels), args.batch_size, args.repeats)
        return
    for path in args.model_path or [str(Path(p).parent) for p in SHIPPED]:
        print(f"\n{path}")
        benchmark(UNet2DModel.from_pretrained(path, subfolder="unet"), args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
