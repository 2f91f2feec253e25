"""Checkpoints are either complete or absent; pipelines are replaced whole."""

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET

from diffusers_flat.errors import FlatError
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.training.checkpointing import save_checkpoint, save_pipeline


def list_checkpoints(path):
    return RunDirectory(path).checkpoints()


def resolve_checkpoint(path, name):
    return RunDirectory(path).resolve_checkpoint(name)


@pytest.fixture
def prepared():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_killed_write_leaves_latest_on_the_previous_checkpoint(tmp_path, prepared, monkeypatch):
    accelerator, model = prepared
    save_checkpoint(accelerator, tmp_path, 1, {"averages": []})
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    real_save = accelerator.save_state

    def dies_half_way(path):
        real_save(path)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(accelerator, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, {"averages": []})
    latest = resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-1"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    monkeypatch.undo()
    accelerator.load_state(str(latest))
    assert torch.equal(model.weight, saved_weight)
    # The next save of the same step replaces the debris.
    save_checkpoint(accelerator, tmp_path, 2, {"averages": []})
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-2"
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_total_limit_keeps_the_newest(tmp_path, prepared):
    accelerator, _ = prepared
    for step in (1, 2, 3, 10):
        save_checkpoint(accelerator, tmp_path, step, {}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]  # numeric order


def test_resolve_names_paths_and_missing(tmp_path, prepared):
    accelerator, _ = prepared
    assert resolve_checkpoint(tmp_path, "latest") is None
    path = save_checkpoint(accelerator, tmp_path, 4, {})
    assert resolve_checkpoint(tmp_path, "checkpoint-4") == path
    assert resolve_checkpoint(tmp_path / "elsewhere", str(path)) == path
    with pytest.raises(FlatError, match=r"checkpoint: no checkpoint 'checkpoint-5' in .* \(available: checkpoint-4"):
        resolve_checkpoint(tmp_path, "checkpoint-5")


def test_save_pipeline_replaces_an_older_one_and_keeps_other_files(tmp_path):
    scheduler = DDPMScheduler()
    torch.manual_seed(0)
    first = UNet2DModel(sample_size=8, **MICRO_UNET)
    torch.manual_seed(1)
    second = UNet2DModel(sample_size=8, **MICRO_UNET)
    (tmp_path / "notes.txt").write_text("keep me")
    save_pipeline(first, scheduler, tmp_path)
    save_pipeline(second, scheduler, tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    for a, b in zip(loaded.unet.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*"))
