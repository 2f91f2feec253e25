"""What a training run writes and reads back: checkpoints that are never half-written (`accelerate` state saved beside
its final name, then renamed in one step), resuming from one, pipelines replaced the same way entry by entry with
their sample grids, and the run's record."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch.optim.swa_utils import AveragedModel

from diffusers_flat import __version__
from diffusers_flat.errors import FlatError
from diffusers_flat.methods.averaging import averaged_unet
from diffusers_flat.run_directory import CHECKPOINT_STATE, RunDirectory, remove_entry, write_atomically, write_json
from diffusers_flat.sampling import image_grid, sample_images
from diffusers_flat.training.config import TrainingConfig, TrainingRecord

logger = logging.getLogger(__name__)


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


def resume_training(
    accelerator: Accelerator, checkpoint: Path, training_state: dict[str, Any], ema: EMAModel | None = None
) -> int:
    """Load a checkpoint saved by `save_checkpoint` into the prepared objects and return its step. `training_state`
    is what this run would save (the averages kept, the timestep sampler, the SAM mode); a checkpoint saved with
    another is refused, since its registered objects would not match.

    Collective: every process must call it.
    """
    state = read_training_state(checkpoint)
    saved = {"averages": state.get("averages", []), "timestep_sampler": state.get("timestep_sampler", "uniform")}
    saved["sam_mode"] = state.get("sam_mode", "full")
    if saved != training_state:
        raise FlatError(
            f"checkpoint {checkpoint.name} was saved with {saved} but this run has {training_state}; resume with the "
            "same use_ema/use_swa/timestep_sampler/sam_mode",
            "checkpoint",
        )
    accelerator.load_state(str(checkpoint))
    if ema is not None:
        # accelerate loads registered objects onto the CPU and EMAModel keeps them there: back to the model's device,
        # as diffusers' train_unconditional.py does.
        ema.to(accelerator.device)
    return state["global_step"]


def save_outputs(
    run: RunDirectory,
    unet: UNet2DModel,
    averages: dict[str, EMAModel | AveragedModel],
    scheduler: DDPMScheduler,
    samples_name: str | None = None,
    num_samples: int = 16,
    num_inference_steps: int = 100,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Save the trained pipeline and one per average (`averages`: "ema", "swa"; an SWA average that has not averaged
    yet is skipped) into the run directory and, if `samples_name` is given, a sample grid of each
    (`samples/<samples_name>.png` and `sample_grid.png`). Returns the samples by variant."""
    pipelines = {"raw": unet} | {name: averaged_unet(unet, average) for name, average in averages.items()}
    if "swa" in averages and averages["swa"].n_averaged.item() == 0:
        del pipelines["swa"]
    samples = {}
    for variant, weights in pipelines.items():
        save_pipeline(weights, scheduler, run.pipeline_path(variant))
        if samples_name is None:
            continue
        images = sample_images(weights, scheduler, num_samples, num_inference_steps, seed=seed, show_progress=False)
        grid = image_grid(images)
        run.samples_path(variant).mkdir(exist_ok=True)
        grid.save(run.samples_path(variant) / f"{samples_name}.png")
        grid.save(run.sample_grid_path(variant))
        samples[variant] = images
    return samples


def run_record(args: argparse.Namespace, accelerator: Accelerator, unet: UNet2DModel, **resolved: Any) -> dict:
    """What `training_args.json` records (`TrainingRecord`): the configuration the flags make (the Hub token left out:
    a secret is never on disk, never pushed), the values the run resolved (`resolved`: steps, SWA start, batch,
    dataset size), the processes, the precision, the model's size and the versions."""
    config = TrainingConfig(**vars(args))
    if config.model_card_template:  # an absolute path: the card is refreshed later from wherever the evaluation runs
        config = dataclasses.replace(config, model_card_template=str(Path(config.model_card_template).resolve()))
    resolved |= {
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "versions": {"diffusers_flat": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "python": platform.python_version(),
    }
    return TrainingRecord(config, resolved).to_json()


def start_run(
    run: RunDirectory, resume_from_checkpoint: str | None, overwrite_output_dir: bool, is_main_process: bool
) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), after refusing to start a fresh run on top of another one
    unless asked to (`overwrite_output_dir`, which then removes the old run's checkpoints). The output directory
    exists when this returns.

    Collective: every process calls it; only the main process removes anything.
    """
    checkpoint = run.resolve_checkpoint(resume_from_checkpoint) if resume_from_checkpoint else None
    if resume_from_checkpoint and checkpoint is None:
        logger.warning(f"No checkpoint in {run.path} yet: starting a new training run.")
    if checkpoint is None:
        if run.path.exists() and not run.path.is_dir():
            raise FlatError(f"output_dir: '{run.path}' exists and is not a directory", "output_dir")
        if run.holds_run() and not overwrite_output_dir:
            raise FlatError(
                f"output_dir '{run.path}' already holds a run; resume it (resume_from_checkpoint latest) or replace "
                "it (overwrite_output_dir)",
                "output_dir",
            )
        if is_main_process and overwrite_output_dir:
            for stale in run.checkpoints():
                remove_entry(stale)
    run.path.mkdir(parents=True, exist_ok=True)
    return checkpoint
