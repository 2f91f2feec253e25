"""The cost of SAM and of each cheaper SAM mode over a plain optimizer step, measured in one run on one model/batch.

    python benchmarks/sam_overhead.py [--preset tiny] [--resolution 16] [--batch_size 64] [--cycles 4]
    python benchmarks/sam_overhead.py --preset adm-cifar10 --resolution 32 --batch_size 8 --cycles 1  # a larger one

A mode's cost is the mean step time over a cycle of 20 optimizer steps, which holds every mode's pattern whole:
`every` and `looksam` at K = 5 take SAM's two passes on 4 of the 20 steps; `late` with its start at 0.75 of training
runs 15 plain steps and then 5 SAM steps, the proportion of a whole run. Cycles of the modes alternate, so machine
noise hits all alike; the ratio of each mode's median cycle time to the plain cycle's is printed (full SAM's floor is
2.0: two forward/backward passes), with each mode's memory beyond the plain optimizer in copies of the trainable
parameters that it holds between steps (SAM's backup of w; LookSAM also keeps its component g_v, and on its SAM
steps copies g for a moment), and on CUDA each mode's peak memory over the plain step's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import SAM_MODES, SAMMode, sam_mode
from diffusers_flat.training.models import build_unet
from diffusers_flat.training.step import MicroBatch, draw_step_noise, train_step

CYCLE, EVERY, LATE_START = 20, 5, 0.75


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors or [])


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=4, help="Timed cycles of 20 steps per mode.")
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
    sam = SAM(model.named_parameters(), rho=args.rho)
    modes = {"plain": None} | {
        mode: sam_mode(sam, mode, every=EVERY, start_step=round(LATE_START * CYCLE)) for mode in SAM_MODES
    }

    def cycle(mode: SAMMode | None) -> float:
        """Seconds per step over one cycle of the mode."""
        synchronize()
        start = time.perf_counter()
        for step in range(CYCLE):
            train_step(accelerator, model, optimizer, scheduler, batch, sam=mode, step=step)
        synchronize()
        return (time.perf_counter() - start) / CYCLE

    for mode in modes.values():  # warm-up: allocator, Adam state, LookSAM's first component
        train_step(accelerator, model, optimizer, scheduler, batch, sam=mode, step=0)
    times = {name: [] for name in modes}
    for _ in range(args.cycles):
        for name, mode in modes.items():
            times[name].append(cycle(mode))

    peaks = {}
    if torch.cuda.is_available():
        for name, mode in modes.items():
            torch.cuda.reset_peak_memory_stats()
            cycle(mode)
            peaks[name] = torch.cuda.max_memory_allocated()

    plain, param_bytes = statistics.median(times["plain"]), tensor_bytes(params)
    print(
        f"device: {accelerator.device}, model: {args.preset} ({sum(p.numel() for p in params):,} parameters), "
        f"batch {args.batch_size} at {args.resolution}x{args.resolution}, {args.cycles} cycles of {CYCLE} steps "
        f"per mode (K = {EVERY}, late from {LATE_START})"
    )
    print(f"{'mode':<10} {'ms/step':>8} {'x plain':>8} {'held (param copies)':>20} {'CUDA peak - plain':>18}")
    for name, values in times.items():
        mode = modes[name]
        held = 0 if mode is None else tensor_bytes(sam._backup) + sum(map(tensor_bytes, mode.state_dict().values()))
        peak = f"{(peaks[name] - peaks['plain']) / param_bytes:.2f}" if peaks else "-"
        median = statistics.median(values)
        print(f"{name:<10} {median * 1000:>8.1f} {median / plain:>8.3f} {held / param_bytes:>20.2f} {peak:>18}")


if __name__ == "__main__":
    main()
