"""Results stay out of the source tree: no tracked file over 1 MB but the Space's shipped models, and each study's
committed folder (what `run_study.py --export` keeps) writes its report again by itself."""

import fnmatch
import json
import shutil
import subprocess

import pytest
import run_study
from conftest import REPO

MAX_BYTES = 1 << 20
ALLOWED = ("spaces_app/models/*/unet/diffusion_pytorch_model.safetensors",)  # the Space's pair, stored once


def oversized(repository) -> list[str]:
    """The tracked files of a git checkout over 1 MB that the allow-list does not name."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repository, capture_output=True, check=True).stdout
    paths = [p for p in listed.decode().split("\0") if p]
    return [
        p
        for p in paths
        if (repository / p).is_file()
        and (repository / p).stat().st_size > MAX_BYTES
        and not any(fnmatch.fnmatch(p, pattern) for pattern in ALLOWED)
    ]


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_no_tracked_file_over_1_mb_but_the_spaces_models():
    assert oversized(REPO) == []


def test_the_size_check_sees_a_large_file_added_outside_the_allow_list(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    model = tmp_path / "spaces_app" / "models" / "a" / "unet" / "diffusion_pytorch_model.safetensors"
    grids = tmp_path / "study-x" / "eval" / "grid.png"
    for path in (model, grids, tmp_path / "small.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * (MAX_BYTES + 1 if path.suffix != ".json" else 10))
    subprocess.run(["git", "add", "-f", "."], cwd=tmp_path, check=True)
    assert oversized(tmp_path) == ["study-x/eval/grid.png"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cheap-sam", "memorization", "memorization-sweep"])
def test_a_committed_study_folder_writes_its_report_again_by_itself(name, tmp_path):
    committed = REPO / "docs" / f"study-{name}"
    copy = tmp_path / name
    shutil.copytree(committed, copy)
    recorded = json.loads((committed / "report.json").read_text())
    (copy / "report.json").unlink()
    (copy / "report.md").unlink()
    study = recorded["settings"]["study"]
    run_study.main(run_study.parse_args(["--study", study, "--output_dir", str(copy), "--report_only"]))
    again = json.loads((copy / "report.json").read_text())
    assert again == recorded
    assert (copy / "report.md").read_text() == (committed / "report.md").read_text()
    assert sum(f.stat().st_size for f in committed.rglob("*") if f.is_file()) < 5 * MAX_BYTES
