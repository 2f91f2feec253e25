"""Publish a trained (and possibly evaluated) run directory on the Hugging Face Hub: the pipeline(s), the model card,
evaluation results and plots (`RunDirectory.files_to_push`). Never checkpoints, optimizer state, logs or the
token."""

from __future__ import annotations

import os

from huggingface_hub import CommitOperationAdd, HfApi

from diffusers_flat.errors import FlatError
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.run_directory import RunDirectory


class HubError(FlatError):
    """The dir cannot be pushed as asked; the message says why."""


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """Refresh the run directory's model card for `repo_id` (from `template`, if given), create the repo if needed
    and upload `RunDirectory.files_to_push` in one commit. Returns the commit's URL."""
    run = RunDirectory(output_dir)
    if token:
        for name in run.files_to_push():
            if name.endswith((".json", ".md")) and token in (run.path / name).read_text(errors="ignore"):
                raise HubError(f"{run.path / name} contains the Hub token; remove it before pushing")
    write_model_card(run.path, repo_id, template)
    files = run.files_to_push()
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run.path / name)) for name in files]
    commit = api.create_commit(
        repo.repo_id, operations, commit_message="Upload DDPM pipeline trained with diffusers-flat", repo_type="model"
    )
    return commit.commit_url
