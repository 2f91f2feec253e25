"""Run under `accelerate launch --multi_gpu --num_processes 2`: SAM steps with real gloo ranks.

Prints one JSON line from rank 0: the world size, whether the ranks' weights were identical after every step, and
whether the ascent points (w + e) were identical across ranks (they must be in global mode, must not in local).
"""

import json
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from diffusers import DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET

from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import SAMMode
from diffusers_flat.training.step import MicroBatch, draw_step_noise, train_step
from diffusers_flat.utils.processes import leave_without_teardown


class RecordingSAM(SAM):
    def ascend(self):
        norm = super().ascend()
        self.ascent_point = torch.cat([p.detach().flatten() for p in self.params])
        return norm


def same_on_all_ranks(accelerator, vector):
    gathered = accelerator.gather(vector.unsqueeze(0))
    return all(torch.equal(gathered[0], row) for row in gathered[1:])


def main(mode):
    # A collective that waits longer than this fails instead of hanging until gloo's 30-minute default.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **MICRO_UNET)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(unet, optimizer)
    sam = RecordingSAM(unet.named_parameters(), rho=0.1)
    sam_mode = SAMMode(sam)
    in_sync, same_ascent = [], []
    for step in range(3):
        rank = accelerator.process_index
        noise, timesteps, _ = draw_step_noise(0, step, 8, (3, 8, 8), 1000)
        rows = slice(4 * rank, 4 * rank + 4)
        clean = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(step)) * 2 - 1
        batches = [MicroBatch(clean[rows], noise[rows], timesteps[rows])]
        train_step(accelerator, model, optimizer, DDPMScheduler(), batches, sam=sam_mode, sam_ascent=mode)
        in_sync.append(same_on_all_ranks(accelerator, torch.cat([p.detach().flatten() for p in unet.parameters()])))
        same_ascent.append(same_on_all_ranks(accelerator, sam.ascent_point))
    if accelerator.is_main_process:
        print(json.dumps({"world_size": accelerator.num_processes, "in_sync": in_sync, "same_ascent": same_ascent}))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    leave_without_teardown(accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
