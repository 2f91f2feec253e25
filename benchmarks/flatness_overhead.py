"""What `--flatness_every N` costs: one in-training LPF estimate against N plain optimizer steps, measured in one run
on the same model.

    python benchmarks/flatness_overhead.py [--preset tiny] [--resolution 16] [--batch_size 32] [--every 100]

Prints the median time of a plain step, of one estimate (`FlatnessLog.measure` with the training script's defaults:
8 draws on 64 images), and the overhead ratio estimate / (every x step) (goal < 0.10 at every = 100).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from diffusers_flat.metrics.flatness_log import FlatnessLog
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.training.models import build_unet
from diffusers_flat.training.step import MicroBatch, draw_step_noise, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = build_unet(args.preset, args.resolution, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = DDPMScheduler()
    shape = (1, args.resolution, args.resolution)
    noise, timesteps, _ = draw_step_noise(0, 0, args.batch_size, shape, 1000)
    images = torch.rand(args.batch_size, *shape) * 2 - 1
    batch = [MicroBatch(*(x.to(accelerator.device) for x in (images, noise, timesteps)))]
    fixed = torch.rand(args.samples, *shape) * 2 - 1
    log = FlatnessLog(RunDirectory(tempfile.mkdtemp()), scheduler, fixed, args.draws)
    unet = accelerator.unwrap_model(model)

    def timed(work) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step = lambda: train_step(accelerator, model, optimizer, scheduler, batch)  # noqa: E731
    timed(step), timed(lambda: log.measure(unet, 0))  # warm-up
    steps, estimates = [], []
    for _ in range(args.repeats):  # alternating, so that machine noise hits both alike
        steps += [timed(step) for _ in range(10)]
        estimates.append(timed(lambda: log.measure(unet, 0)))
    step_time, estimate_time = statistics.median(steps), statistics.median(estimates)
    threads = torch.get_num_threads()
    size = f"{args.resolution}x{args.resolution}"
    print(f"{args.preset} UNet, {size}, batch {args.batch_size}, {accelerator.device}, {threads} threads")
    estimate = f"LPF estimate ({args.draws} draws x {args.samples} images) {1e3 * estimate_time:.1f} ms"
    print(f"plain step {1e3 * step_time:.1f} ms, {estimate}")
    ratio = estimate_time / (args.every * step_time)
    print(f"--flatness_every {args.every}: overhead {ratio:.3f} of training time (goal < 0.10)")


if __name__ == "__main__":
    main()
