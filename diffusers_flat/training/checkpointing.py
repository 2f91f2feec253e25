"""Checkpoints that are never half-written: `accelerate` state saved beside its final name, then renamed in one step;
pipelines replaced the same way, entry by entry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_flat.run_directory import CHECKPOINT_STATE, RunDirectory, remove_entry, write_atomically, write_json


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    """What the training loop stored beside the accelerate state (the step, the averages kept)."""
    return json.loads((checkpoint / CHECKPOINT_STATE).read_text())


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    training_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Save the accelerate state (model, optimizer, registered objects, RNG) as `output_dir/checkpoint-{step}`.

    Collective: every process must call it.
    """
    run = RunDirectory(output_dir)
    final = run.checkpoint_path(step)
    partial = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process:
        remove_entry(partial)  # debris of a killed save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        write_json(partial / CHECKPOINT_STATE, {"global_step": step, **training_state})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state is complete: it takes the checkpoint's name in one step.
        remove_entry(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in run.checkpoints()[:-total_limit]:
                remove_entry(old)
    accelerator.wait_for_everyone()
    return final


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, directory: str | os.PathLike) -> None:
    """Save a `DDPMPipeline` into `directory`, replacing a previous one entry by entry, each entry at once.

    Other files in `directory` (checkpoints, logs, samples, evaluations) are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / ".pipeline.partial"
    remove_entry(staging)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
    for entry in sorted(staging.iterdir()):
        write_atomically(directory / entry.name, lambda tmp, entry=entry: os.replace(entry, tmp))
    staging.rmdir()
