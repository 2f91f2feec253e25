"""Checkpoints that are never half-written: `accelerate` state saved beside its final name, then renamed in one
step; pipelines and small files replaced the same way."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = "training_state.json"


class CheckpointError(ValueError):
    """A checkpoint that was asked for but cannot be used."""


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, name: str) -> Path | None:
    """The checkpoint directory `name` stands for: "latest" (None if there is none yet), a name in `output_dir`,
    or a path."""
    available = list_checkpoints(output_dir)
    if name == "latest":
        return available[-1] if available else None
    for candidate in (Path(output_dir) / name, Path(name)):
        if (candidate / TRAINING_STATE).is_file():
            return candidate
    have = ", ".join(p.name for p in available) or "none"
    raise CheckpointError(
        f"--resume_from_checkpoint: no checkpoint '{name}' in {output_dir} (available: {have}; or use 'latest')"
    )


def read_training_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINING_STATE).read_text())


def _remove(path: Path) -> None:
    # Rename first so that a kill during the deletion leaves no directory with a checkpoint's name.
    doomed = path.with_name(f".{path.name}.deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


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
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    partial = root / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        write_json(partial / TRAINING_STATE, {"global_step": step, **training_state})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            _remove(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                _remove(old)
    accelerator.wait_for_everyone()
    return final


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file, so that `path` is always either old or new, never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler, directory: str | os.PathLike) -> None:
    """Save a `DDPMPipeline` into `directory`, replacing a previous one entry by entry, each entry at once.

    Other files in `directory` (checkpoints, logs, samples) are left alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / ".pipeline.partial"
    if staging.exists():
        shutil.rmtree(staging)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging)
    for entry in sorted(staging.iterdir()):
        target = directory / entry.name
        if target.is_dir():
            _remove(target)
        os.replace(entry, target)
    staging.rmdir()
