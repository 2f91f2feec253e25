"""Run under `accelerate launch --multi_gpu --num_processes 2`: a few steps of each cheap SAM mode with real gloo
ranks; rank 0 saves every mode's final weights to the file named by the first argument. `train_modes` in one process
gives what one process on the global batch trains, to compare with."""

import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers import DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET

from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import sam_mode
from diffusers_flat.training.step import MicroBatch, draw_step_noise, train_step
from diffusers_flat.utils.processes import leave_without_teardown

MODES = {
    "every": {"every": 2},
    "looksam": {"every": 2},
    "momentum": {},
    "late": {"start_step": 2},
    "random": {"seed": 3},
}
GLOBAL_BATCH, STEPS = 8, 4


def train_modes(accelerator: Accelerator) -> dict[str, dict[str, torch.Tensor]]:
    """Each mode's weights after STEPS steps from one initialisation, this process training on its share of every
    step's global batch."""
    share = GLOBAL_BATCH // accelerator.num_processes
    rows = slice(share * accelerator.process_index, share * (accelerator.process_index + 1))
    results = {}
    for mode, options in MODES.items():
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **MICRO_UNET)
        # A large Adam epsilon keeps Adam from blowing float rounding in near-zero gradients up to a full step.
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, eps=1e-3)
        model, optimizer = accelerator.prepare(unet, optimizer)
        sam = sam_mode(SAM(unet.named_parameters(), rho=0.1), mode, **options)
        for step in range(STEPS):
            noise, timesteps, _ = draw_step_noise(0, step, GLOBAL_BATCH, (3, 8, 8), 1000)
            clean = torch.rand(GLOBAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1
            batches = [MicroBatch(clean[rows], noise[rows], timesteps[rows])]
            train_step(accelerator, model, optimizer, DDPMScheduler(), batches, sam=sam, step=step)
        results[mode] = {name: p.detach().clone() for name, p in unet.named_parameters()}
    return results


def main(path: str) -> None:
    # A collective that waits longer than this fails instead of hanging until gloo's 30-minute default.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
    results = train_modes(accelerator)
    if accelerator.is_main_process:
        torch.save({"world_size": accelerator.num_processes, "weights": results}, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    leave_without_teardown(accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
