"""On CUDA (skipped without it): training with every method in bf16, resuming with EMA, every SAM mode in fp16 and
its skipped steps, the paper's ADM recipe (learned variance, timestep sampler) with SAM, evaluation of every metric
on the GPU agreeing with the CPU, the pipeline samplers against the diffusers pipelines, the int8 and int4 deployment
paths and their reload, the Space's generate and compare functions, PFD against a teacher and against the empirical
denoiser, and a noise-unconditional training on a subset. On a GPU machine: `python -m pytest tests/test_gpu.py`.
"""

import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, micro_args, per_image_generators, run_script, run_training
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import SAMMode
from diffusers_flat.quantization import load_quantized, quantize_for_deployment, save_quantized
from diffusers_flat.sampling import pipeline_samples
from diffusers_flat.training.step import MicroBatch, draw_step_noise, train_step

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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


@pytest.mark.parametrize("mode", ["full", "every", "looksam", "momentum", "late", "random"])
def test_every_sam_mode_trains_in_fp16_then_resumes_exactly(tmp_path, micro_unet_config, mode):
    """accelerate's real GradScaler on CUDA: both SAM passes under one scale, a resumed run equal to a straight one."""
    flags = f"--max_train_steps 4 --checkpointing_steps 2 --sam_rho 0.1 --sam_mode {mode} --mixed_precision fp16"
    flags += {"every": " --sam_every 3", "looksam": " --sam_every 3", "late": " --sam_start 0.5"}.get(mode, "")
    straight = tmp_path / "straight"
    run_training(*micro_args(straight, micro_unet_config, *flags.split()))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run_training(*micro_args(resumed, micro_unet_config, *flags.split(), "--resume_from_checkpoint", "latest"))
    a, b = (UNet2DModel.from_pretrained(run, subfolder="unet").state_dict() for run in (straight, resumed))
    assert all(torch.isfinite(a[n]).all() and torch.equal(a[n], b[n]) for n in a)


def test_an_inf_in_either_sam_pass_skips_the_fp16_step_on_cuda():
    """The CPU test injects an inf with torch's GradScaler put in by hand; here accelerate's own, on CUDA."""
    accelerator = Accelerator(mixed_precision="fp16")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(unet, optimizer)
    sam = SAMMode(SAM(unet.named_parameters(), rho=0.1))
    calls = {"n": 0, "poisoned": -1}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == calls["poisoned"]:
            return output * float("inf")

    unet.conv_out.register_forward_hook(poison)
    noise, timesteps, _ = draw_step_noise(0, 0, 4, (3, 8, 8), 1000)
    batch = [MicroBatch(torch.rand(4, 3, 8, 8, device="cuda") * 2 - 1, noise.cuda(), timesteps.cuda())]
    train_step(accelerator, model, optimizer, DDPMScheduler(), batch, sam=sam)
    for poisoned_pass in (1, 2):  # the ascent pass, then the descent pass, of the next step
        before = [p.detach().clone() for p in unet.parameters()]
        scale = accelerator.scaler.get_scale()
        calls["poisoned"] = calls["n"] + poisoned_pass
        stats = train_step(accelerator, model, optimizer, DDPMScheduler(), batch, sam=sam)
        assert optimizer.step_was_skipped and stats.sharpness is None
        assert all(torch.equal(p, b) for p, b in zip(unet.parameters(), before))
        assert accelerator.scaler.get_scale() == scale / 2


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


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_deployment_runs_on_cuda_and_reloads(two_models, bits, tmp_path):
    fp32 = UNet2DModel.from_pretrained(two_models[0], subfolder="unet").to("cuda").eval()
    quantized = quantize_for_deployment(UNet2DModel.from_pretrained(two_models[0], subfolder="unet"), bits)
    save_quantized(quantized, tmp_path / f"int{bits}")
    quantized, reloaded = quantized.to("cuda"), load_quantized(tmp_path / f"int{bits}").to("cuda")
    x, t = torch.randn(4, 1, 8, 8, device="cuda"), torch.tensor([10, 200, 500, 900], device="cuda")
    with torch.no_grad():
        a, b = fp32(x, t).sample, quantized(x, t).sample
        assert torch.equal(reloaded(x, t).sample, b)
    assert b.device.type == "cuda"
    assert ((a - b).norm() / a.norm()).item() < (0.05 if bits == 8 else 0.5)


@pytest.mark.parametrize(("sampler", "pipeline_class"), [("ddim", DDIMPipeline), ("ddpm", DDPMPipeline)])
def test_the_pipeline_samplers_on_cuda_are_the_diffusers_pipelines(two_models, sampler, pipeline_class):
    pipeline = pipeline_class.from_pretrained(two_models[0]).to("cuda")
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(batch_size=4, generator=per_image_generators(4), num_inference_steps=10, output_type="np").images
    unet = pipeline.unet
    scheduler = DDPMScheduler.from_pretrained(two_models[0], subfolder="scheduler")
    ours = pipeline_samples(unet, scheduler, 4, 10, show_progress=False, sampler=sampler)
    np.testing.assert_array_equal(ours, theirs)


def test_the_adm_recipe_with_sam_trains_and_resumes_on_cuda(tmp_path, micro_unet_config):
    adm = {**json.loads(micro_unet_config.read_text()), "resnet_time_scale_shift": "scale_shift", "dropout": 0.3}
    (tmp_path / "adm.json").write_text(json.dumps(adm))
    flags = [f"@{REPO / 'recipes' / 'paper-cifar10.txt'}", "--dataset_name", "", "--image_column", "image"]
    flags += ["--model_config_name_or_path", str(tmp_path / "adm.json"), "--resolution", "8", "--ddpm_num_steps", "2"]
    flags += ["--train_batch_size", "8", "--max_train_steps", "6", "--checkpointing_steps", "3", "--sam_rho", "0.1"]
    flags += ["--use_ema", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2"]
    run_training(*flags, "--output_dir", str(tmp_path / "straight"))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    run_training(*flags, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest")
    for variant in ("", "ema"):
        unet = UNet2DModel.from_pretrained(tmp_path / "resumed" / variant, subfolder="unet")
        assert unet.config.out_channels == 2 and all(torch.isfinite(p).all() for p in unet.parameters())


def test_the_space_generates_on_cuda(two_models, monkeypatch):
    monkeypatch.setenv("FLAT_MODELS", str(two_models[1]))
    monkeypatch.syspath_prepend(str(REPO / "spaces_app"))
    app = importlib.import_module("app")
    assert app.DEVICE.type == "cuda" and os.environ["FLAT_MODELS"] in app.MODELS
    for level in ("fp32", "4-bit per_tensor", "8-bit per_channel", "4-bit per_channel"):
        assert next(app.load_unet(app.MODELS[0], level).parameters()).device.type == "cuda"
    name = next(iter(app.SERVED))
    for precision in app.PRECISIONS:
        fp32_grid, quantized_grid, difference, summary, _ = app.generate(name, 0, "ddim", 20, precision, 4)
        assert fp32_grid.size == quantized_grid.size and f"**{precision}**" in summary
    for bits, granularity in ((4, "per_channel"), (4, "per_tensor")):  # the real int4 path, and direct quantization
        figure, comparison, _ = app.compare_models(bits, granularity, 0, "ddim", 20, 2)
        assert figure.size[0] > 0 and "pixels moved" in comparison


def test_pfd_on_cuda_agrees_with_the_cpu(two_models, tmp_path):
    """E_gen (against the other model) and E_mem (the empirical denoiser, built on the model's device)."""
    flags = "--metrics pfd --pfd_noises 16 --pfd_steps 4"
    for reference in (two_models[1], "empirical"):
        results = {}
        for device in ("cuda", "cpu"):
            out = tmp_path / f"{device}-{len(results)}-{reference == 'empirical'}"
            model = shutil.copytree(two_models[0], out / "adm")
            argv = ["--model_path", model, *flags.split(), "--pfd_reference", reference, "--device", device]
            result = run_script("evaluate_flat", *argv, "--output_dir", out / "eval")
            assert result.returncode == 0, result.stderr[-3000:]
            results[device] = json.loads((out / "eval" / "eval_results.json").read_text())["adm"]["pfd"]
        assert results["cuda"]["pfd"] == pytest.approx(results["cpu"]["pfd"], rel=1e-2)


def test_a_noise_unconditional_training_on_a_subset_on_cuda(tmp_path, micro_unet_config):
    out = tmp_path / "nu"
    flags = "--max_train_steps 3 --noise_unconditional --train_subset 16 --sam_rho 0.1 --use_ema"
    run_training(*micro_args(out, micro_unet_config, *flags.split()))
    assert json.loads((out / "training_args.json").read_text())["dataset_size"] == 16
    unet = UNet2DModel.from_pretrained(out, subfolder="unet").to("cuda")
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, device="cuda")
    with torch.no_grad():
        assert torch.equal(unet(x, 0).sample, unet(x, 999).sample)
