"""Real multi-process runs: two gloo ranks on the CPU, started by `accelerate launch` as the README says."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, launch_two_processes, micro_args, run_training
from distributed_sam_modes_check import MODES, train_modes
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # real gloo process groups


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_process_global_sam_matches_one_process_on_the_global_batch(tmp_path, micro_unet_config):
    # A large Adam epsilon keeps Adam from blowing float rounding in near-zero gradients up to a full step.
    common = [
        "--max_train_steps",
        "3",
        "--sam_rho",
        "0.1",
        "--sam_ascent",
        "global",
        "--input_perturbation",
        "0.1",
        "--adam_epsilon",
        "1e-3",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    run_training(*micro_args(two, micro_unet_config, *common, "--train_batch_size", "4"), two_processes=True)
    run_training(*micro_args(one, micro_unet_config, *common, "--train_batch_size", "8"))
    assert json.loads((two / "training_args.json").read_text())["num_processes"] == 2
    a, b = weights(one), weights(two)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


@pytest.mark.parametrize("mode", ["global", "local"])
def test_sam_ranks_stay_in_sync(mode):
    result = launch_two_processes(str(REPO / "tests" / "distributed_sam_check.py"), mode, cwd=REPO / "tests")
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "rror" in line)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2
    assert report["in_sync"] == [True, True, True]
    # m-sharpness: each rank perturbs along its own gradient; global: one shared perturbation.
    assert report["same_ascent"] == ([True] * 3 if mode == "global" else [False] * 3)


def test_each_cheap_sam_mode_on_two_processes_matches_one_process_on_the_global_batch(tmp_path):
    saved = tmp_path / "two.pt"
    result = launch_two_processes(
        str(REPO / "tests" / "distributed_sam_modes_check.py"), str(saved), cwd=REPO / "tests"
    )
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "rror" in line)
    two = torch.load(saved)
    assert two["world_size"] == 2
    one = train_modes(Accelerator(cpu=True))
    assert set(two["weights"]) == set(one) == set(MODES)
    for mode, weights in one.items():
        assert max((weights[n] - two["weights"][mode][n]).abs().max().item() for n in weights) < 1e-6, mode


def test_local_ascent_mode_trains_through_the_cli_in_bf16(tmp_path, micro_unet_config):
    out = tmp_path / "local"
    run_training(
        *micro_args(
            out,
            micro_unet_config,
            "--max_train_steps",
            "2",
            "--sam_rho",
            "0.1",
            "--sam_ascent",
            "local",
            "--train_batch_size",
            "4",
            "--mixed_precision",
            "bf16",
        ),
        two_processes=True,
    )
    args = json.loads((out / "training_args.json").read_text())
    assert args["num_processes"] == 2 and args["mixed_precision"] == "bf16"
    assert (out / "model_index.json").is_file()
