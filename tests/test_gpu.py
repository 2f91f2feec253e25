"""On CUDA (skipped without it): training with every method in bf16, resuming with EMA, evaluation of every metric on
the GPU agreeing with the CPU, and the int8 deployment path. On a GPU machine: `python -m pytest tests/test_gpu.py`.
"""

import json
import shutil

import pytest
import torch
from conftest import micro_args, run_script, run_training
from diffusers import UNet2DModel

from diffusers_flat.quantization import quantize_for_deployment

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_every_method_in_bf16_then_resume_with_ema(tmp_path, micro_unet_config):
    flags = "--max_train_steps 4 --checkpointing_steps 2 --sam_rho 0.1 --use_ema --use_swa --swa_start 1 --swa_cycle 1"
    flags += " --input_perturbation 0.1 --mixed_precision bf16"
    straight = tmp_path / "straight"
    run_training(*micro_args(straight, micro_unet_config, *flags.split()))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    # Before the fix, the first EMA step after a resume mixed CPU and CUDA tensors and crashed.
    result = run_training(
        *micro_args(resumed, micro_unet_config, *flags.split(), "--resume_from_checkpoint", "latest")
    )
    assert "Resumed from" in result.stderr
    for variant in ("", "ema", "swa"):
        unet = UNet2DModel.from_pretrained(resumed / variant, subfolder="unet")
        assert all(torch.isfinite(p).all() for p in unet.parameters())


def test_every_metric_on_cuda_agrees_with_the_cpu(two_models, tmp_path):
    small = "--num_samples 100 --num_real 100 --inference_steps 2 4 --lpf_draws 3 --gammas 0 5 --directions 2"
    small += " --surface_resolution 3 --exposure_samples 8 --loss_samples 32 --quantize 8"
    results = {}
    for device in ("cuda", "cpu"):
        model = shutil.copytree(two_models[0], tmp_path / device / "adm")
        result = run_script(
            "evaluate_flat",
            "--model_path",
            model,
            *small.split(),
            "--device",
            device,
            "--output_dir",
            tmp_path / device / "eval",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        results[device] = json.loads((tmp_path / device / "eval" / "eval_results.json").read_text())["adm"]
    gpu, cpu = results["cuda"], results["cpu"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    assert gpu["lpf"]["lpf"] == pytest.approx(cpu["lpf"]["lpf"], rel=1e-3)
    assert gpu["exposure_bias"]["squared_norm_gap"] == pytest.approx(
        cpu["exposure_bias"]["squared_norm_gap"], abs=0.05
    )
    for steps in ("2", "4"):
        assert gpu["fid"][steps] == pytest.approx(cpu["fid"][steps], rel=0.05)


def test_int8_deployment_runs_on_cuda(two_models):
    fp32 = UNet2DModel.from_pretrained(two_models[0], subfolder="unet").to("cuda").eval()
    int8 = quantize_for_deployment(UNet2DModel.from_pretrained(two_models[0], subfolder="unet")).to("cuda")
    x, t = torch.randn(4, 1, 8, 8, device="cuda"), torch.tensor([10, 200, 500, 900], device="cuda")
    with torch.no_grad():
        a, b = fp32(x, t).sample, int8(x, t).sample
    assert b.device.type == "cuda"
    assert ((a - b).norm() / a.norm()).item() < 0.05
