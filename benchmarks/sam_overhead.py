"""SAM's cost over a plain optimizer step, measured in one run on the same model and batch.

    python benchmarks/sam_overhead.py [--preset tiny] [--resolution 16] [--batch_size 64] [--steps 20]

Prints the time ratio SAM step / plain step (floor 2.0: two forward-backward passes; target <= 2.05) and SAM's
extra memory over the plain optimizer in copies of the trainable parameters (target <= 1). Steps alternate between
the two so that machine noise hits both alike; the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from diffusers_flat.methods.sam import SAM
from diffusers_flat.training.models import build_unet
from diffusers_flat.training.step import MicroBatch, draw_step_noise, train_step


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rho", type=float, default=0.1)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = build_unet(args.preset, args.resolution)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = DDPMScheduler()
    shape = (3, args.resolution, args.resolution)
    noise, timesteps, _ = draw_step_noise(0, 0, args.batch_size, shape, 1000)
    batch = [
        MicroBatch(
            torch.rand(args.batch_size, *shape, device=accelerator.device) * 2 - 1,
            noise.to(accelerator.device),
            timesteps.to(accelerator.device),
        )
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    sam = SAM(params, rho=args.rho)

    def timed(use_sam: bool) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(accelerator, model, optimizer, scheduler, batch, sam=sam if use_sam else None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: allocator, Adam state
        timed(False), timed(True)
    plain, with_sam = [], []
    for _ in range(args.steps):
        plain.append(timed(False))
        with_sam.append(timed(True))

    # Memory SAM holds beyond the plain optimizer: its backup of w (e lives in the gradient buffers).
    extra = tensor_bytes(sam._backup)
    param_bytes = tensor_bytes(params)
    ratio = statistics.median(with_sam) / statistics.median(plain)
    print(
        f"device: {accelerator.device}, model: {args.preset} ({sum(p.numel() for p in params):,} parameters), "
        f"batch {args.batch_size} at {args.resolution}x{args.resolution}, {args.steps} steps each"
    )
    print(f"plain step: {statistics.median(plain) * 1000:.1f} ms (median)")
    print(f"SAM step:   {statistics.median(with_sam) * 1000:.1f} ms (median)")
    print(f"SAM / plain step time: {ratio:.3f}  (floor 2.0, target <= 2.05)")
    print(
        f"SAM extra memory: {extra / param_bytes:.2f} copies of the trainable parameters "
        f"({extra / 2**20:.1f} MiB; target <= 1)"
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        timed(False)
        peak_plain = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed(True)
        peak_sam = torch.cuda.max_memory_allocated()
        print(f"CUDA peak memory, SAM - plain: {(peak_sam - peak_plain) / param_bytes:.2f} parameter copies")


if __name__ == "__main__":
    main()
