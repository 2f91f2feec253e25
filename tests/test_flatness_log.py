"""Flatness during training (`--flatness_every`): the logged LPF estimate is the LPF of the saved model computed
after the fact with the same triples and draws, the TensorBoard log holds the scalars, and a resumed run continues
the series exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
import train_flat_ddpm
from conftest import micro_args, run_cli, run_training, train_here
from diffusers import DDPMScheduler, UNet2DModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusers_flat.data.images import load_digits_dataset
from diffusers_flat.metrics.flatness import DiffusionLoss, lpf_flatness

pytestmark = pytest.mark.slow

FLAGS = "--max_train_steps 4 --checkpointing_steps 2 --flatness_every 2 --flatness_draws 3 --flatness_samples 8"


def test_the_logged_lpf_is_that_of_the_saved_model_and_resumes_exactly(tmp_path, micro_unet_config):
    straight = tmp_path / "straight"
    train_here(*micro_args(straight, micro_unet_config, *FLAGS.split(), "--sam_rho", "0.05"))
    series = json.loads((straight / "flatness.json").read_text())
    assert [entry["step"] for entry in series] == [2, 4] and all("sam_sharpness" in entry for entry in series)

    # After the fact: the first 8 digits (8x8 already: no resize, no crop) in [-1, 1], the saved step-4 model.
    digits = load_digits_dataset()["image"][:8]
    images = torch.stack([torch.from_numpy(np.asarray(d.convert("L"), np.float32) / 127.5 - 1)[None] for d in digits])
    scheduler = DDPMScheduler.from_pretrained(straight, subfolder="scheduler")
    loss = DiffusionLoss(scheduler, images, seed=0, batch_size=8)
    unet = UNet2DModel.from_pretrained(straight, subfolder="unet")
    after = lpf_flatness(unet, loss, sigma=0.01, num_draws=3, seed=0, show_progress=False)
    assert series[1]["lpf"] == pytest.approx(after["lpf"], rel=1e-6)
    assert series[1]["loss"] == pytest.approx(loss(unet), rel=1e-6)

    (events,) = (straight / "logs").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    for tag in ("flatness/lpf", "flatness/loss", "flatness/sharpness_excess"):
        assert [e.step for e in scalars.Scalars(tag)] == [2, 4], tag
    assert [e.value for e in scalars.Scalars("flatness/lpf")] == pytest.approx([e["lpf"] for e in series])

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "flatness.json").write_text(json.dumps(series[:1] + [{"step": 4, "lpf": -1.0}]))  # a stale entry
    args = micro_args(resumed, micro_unet_config, *FLAGS.split(), "--sam_rho", "0.05", "--resume_from_checkpoint")
    run_training(*args, "latest")  # in a fresh process
    assert json.loads((resumed / "flatness.json").read_text()) == series


def test_bad_flatness_flags_are_one_line(tmp_path, micro_unet_config, capsys):
    argv = micro_args(tmp_path / "out", micro_unet_config, "--flatness_every", "-1")
    status, err = run_cli(train_flat_ddpm, argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1 and "--flatness_every must be >= 0 (0: off), got -1" in errors[0]
    assert not (tmp_path / "out").exists()
