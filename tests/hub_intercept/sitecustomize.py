"""Python imports this at start-up when its folder is on PYTHONPATH. It stands in for the Hub's servers, which tests
cannot reach: HfApi's write calls are recorded (JSON lines in $HUB_INTERCEPT_LOG) instead of sent, and any other
HfApi call that would upload fails loudly."""

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, RepoUrl

LOG = Path(os.environ["HUB_INTERCEPT_LOG"])


def _record(**entry) -> None:
    with LOG.open("a") as log:
        log.write(json.dumps(entry) + "\n")


def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
    _record(
        call="create_repo",
        repo_id=repo_id,
        private=private,
        repo_type=repo_type,
        exist_ok=exist_ok,
        token=token or self.token,
    )
    return RepoUrl(f"https://huggingface.co/{repo_id}")


def create_commit(self, repo_id, operations, *, commit_message, token=None, repo_type=None, **kwargs):
    files = {}
    for op in operations:
        source = Path(op.path_or_fileobj)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        files[op.path_in_repo] = {"source": str(source.resolve()), "sha256": digest}
    _record(
        call="create_commit",
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=commit_message,
        token=token or self.token,
        files=files,
    )
    return CommitInfo(
        commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd",
        commit_message=commit_message,
        commit_description="",
        oid="0123abcd",
    )


def _refuse(self, *args, **kwargs):
    raise AssertionError("an HfApi upload call that the test does not intercept")


HfApi.create_repo = create_repo
HfApi.create_commit = create_commit
HfApi.upload_file = HfApi.upload_folder = HfApi.upload_large_folder = _refuse
