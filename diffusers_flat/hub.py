"""Publish a trained (and possibly evaluated) output dir on the Hugging Face Hub: the pipeline(s), the model card,
evaluation results and plots. Never checkpoints, optimizer state, logs or the token."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from .model_card import write_model_card

PUSHED_SUFFIXES = {".json", ".safetensors", ".md", ".png"}
# checkpoint-* (accelerate state: optimizer, RNG, scheduler), logs/ (trackers) and samples/ (grids along the way)
# stay local.
SKIPPED_DIRS = ("checkpoint-", "logs", "samples")


class HubError(ValueError):
    """The dir cannot be pushed as asked; the message says why."""


def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """The files of the output dir that belong on the Hub, as sorted POSIX paths relative to it."""
    root = Path(output_dir)
    if not (root / "model_index.json").is_file():
        raise HubError(f"{root}: not a DDPMPipeline directory (no model_index.json); nothing to push")
    chosen = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if not path.is_file() or path.suffix not in PUSHED_SUFFIXES or ".partial" in str(relative):
            continue
        if any(part.startswith(SKIPPED_DIRS) for part in relative.parts[:-1]):
            continue
        chosen.append(relative.as_posix())
    return sorted(chosen)


def push_to_hub(
    output_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Refresh the dir's model card for `repo_id`, create the repo if needed and upload `files_to_push` in one
    commit. Returns the commit's URL."""
    root = Path(output_dir)
    files = files_to_push(root)
    if token:
        for name in files:
            if name.endswith((".json", ".md")) and token in (root / name).read_text(errors="ignore"):
                raise HubError(f"{root / name} contains the Hub token; remove it before pushing")
    write_model_card(root, repo_id)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name)) for name in files]
    commit = api.create_commit(repo.repo_id, operations, commit_message="Upload DDPM pipeline trained with "
                               "diffusers-flat", repo_type="model")  # fmt: skip
    return commit.commit_url
