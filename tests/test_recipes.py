"""The paper's recipes (flags files) against SPEC section 7, the ADM presets block by block, bad recipes, and an ADM
run from a recipe (learned variance, the timestep sampler, constant-decay EMA) that resumes exactly."""

import json
import shutil

import numpy as np
import pytest
import torch
import train_flat_ddpm
from conftest import REPO, run_cli, run_training
from datasets import Dataset
from datasets import Image as ImageFeature
from safetensors.torch import load_file

from diffusers_flat.training.models import build_unet

# SPEC section 7, written out: what every recipe must resolve to.
COMMON = {
    "learn_sigma": True,
    "ddpm_beta_schedule": "squaredcos_cap_v2",  # cosine
    "ddpm_num_steps": 1000,
    "timestep_sampler": "loss-second-moment",
    "timestep_spacing": "linspace",
    "prediction_type": "epsilon",
    "learning_rate": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.0,
    "max_grad_norm": 0.0,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "ema_max_decay": 0.9999,
    "ema_constant_decay": True,
    "random_flip": True,
    "max_train_steps": 200_000,
    "swa_start": 180_000,
    "swa_cycle": 100,
    "mixed_precision": "bf16",
    "sam_rho": 0.0,  # methods are added on the command line
    "use_ema": False,
    "use_swa": False,
    "input_perturbation": 0.0,
}
RECIPES = {
    "paper-cifar10.txt": {"resolution": 32, "train_batch_size": 128, "dataset_name": "uoft-cs/cifar10"},
    "paper-lsun-tower.txt": {"resolution": 64, "train_batch_size": 256},
    "paper-ffhq.txt": {"resolution": 64, "train_batch_size": 256},
}
# channels, multipliers, attention resolutions, channels per head, dropout
UNETS = {
    "paper-cifar10.txt": (128, (1, 2, 2, 2), {16, 8}, 32, 0.3),
    "paper-lsun-tower.txt": (192, (1, 2, 3, 4), {32, 16, 8}, 64, 0.1),
    "paper-ffhq.txt": (192, (1, 2, 3, 4), {32, 16, 8}, 64, 0.1),
}


def parse_recipe(name: str, *extra: str):
    return train_flat_ddpm.parse_args([f"@{REPO / 'recipes' / name}", *extra])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_resolves_to_the_papers_settings(name):
    args = parse_recipe(name)
    for key, value in {**COMMON, **RECIPES[name]}.items():
        assert getattr(args, key) == value, key
    train_flat_ddpm.check_args(args)
    # A flag after the recipe overrides it.
    assert parse_recipe(name, "--sam_rho", "0.1", "--learning_rate", "2e-4").sam_rho == 0.1


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_the_adm_unet_of_section_7(name):
    args = parse_recipe(name)
    channels, multipliers, attention_at, head_channels, dropout = UNETS[name]
    with torch.device("meta"):
        unet = build_unet(args.model_config_name_or_path, args.resolution, 3, learn_sigma=args.learn_sigma)
    assert (unet.config.in_channels, unet.config.out_channels) == (3, 6)  # epsilon and the variance
    resolution, seen_attention = args.resolution, set()
    for level, block in enumerate(unet.down_blocks):
        resnets = list(block.resnets)
        assert len(resnets) == 3  # residual blocks per level
        assert resnets[0].out_channels == channels * multipliers[level]
        for resnet in resnets:
            assert resnet.time_embedding_norm == "scale_shift" and resnet.dropout.p == dropout
        if getattr(block, "attentions", None):
            seen_attention.add(resolution)
            for attention in block.attentions:
                assert attention.to_q.out_features // attention.heads == head_channels
        if block.downsamplers:
            # residual downsampling: a ResnetBlock2D with down=True, not a strided conv
            assert type(block.downsamplers[0]).__name__ == "ResnetBlock2D" and block.downsamplers[0].down
            resolution //= 2
    assert seen_attention == attention_at
    for block in unet.up_blocks:
        if block.upsamplers:
            assert type(block.upsamplers[0]).__name__ == "ResnetBlock2D" and block.upsamplers[0].up
    print(name, f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters")


def test_a_missing_recipe_or_an_unknown_flag_in_one_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(train_flat_ddpm, ["@recipes/nope.txt"], capsys)
    assert status == 2 and "recipes/nope.txt" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.txt").write_text("--learning_rate 1e-4\n--learnig_rate_typo 3  # a typo\n")
    status, err = run_cli(train_flat_ddpm, ["@bad.txt"], capsys)
    assert status == 2 and "--learnig_rate_typo" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]  # nothing written


# An ADM-shaped UNet small enough for seconds-long runs: residual up/down-sampling, scale-shift norm, dropout.
MICRO_ADM = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "resnet_time_scale_shift": "scale_shift",
    "attention_head_dim": 8,
    "norm_num_groups": 4,
    "dropout": 0.3,
}


@pytest.mark.slow
def test_a_recipe_run_learns_the_variance_and_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(24)]
    from PIL import Image

    data = Dataset.from_dict({"img": [Image.fromarray(a) for a in images]}).cast_column("img", ImageFeature())
    data.save_to_disk(tmp_path / "data")
    (tmp_path / "adm.json").write_text(json.dumps(MICRO_ADM))
    # The CIFAR-10 recipe on local data, a micro ADM and T = 2 (so that the sampler leaves its warm-up of 10 losses
    # per timestep after about 3 steps of 8, before the checkpoint the resumed run starts from); EMA at a constant 0.9
    # instead of 0.9999, to see it move.
    flags = [
        f"@{REPO / 'recipes' / 'paper-cifar10.txt'}",
        *("--dataset_name", str(tmp_path / "data"), "--resolution", "8", "--model_config_name_or_path"),
        *(str(tmp_path / "adm.json"), "--ddpm_num_steps", "2", "--train_batch_size", "8", "--max_train_steps", "8"),
        *("--mixed_precision", "no", "--checkpointing_steps", "1", "--checkpoints_total_limit", "100"),
        *("--use_ema", "--ema_max_decay", "0.9", "--eval_batch_size", "2", "--ddpm_num_inference_steps", "2"),
        "--learning_rate",
        "1e-3",
    ]
    straight = tmp_path / "straight"
    run_training(*flags, "--output_dir", str(straight))

    config = json.loads((straight / "scheduler" / "scheduler_config.json").read_text())
    assert config["variance_type"] == "learned_range" and config["beta_schedule"] == "squaredcos_cap_v2"
    assert json.loads((straight / "unet" / "config.json").read_text())["out_channels"] == 6
    sampler_state = torch.load(straight / "checkpoint-8" / "custom_checkpoint_2.pkl", weights_only=False)
    assert sampler_state["counts"].tolist() == [10, 10]  # warmed up: the last steps drew t from p

    # Constant-decay EMA: a copy of the weights after step 1, then ema <- 0.9 ema + 0.1 w at every step.
    ema = None
    for n in range(1, 9):
        weights = load_file(straight / f"checkpoint-{n}" / "model.safetensors")
        ema = weights if ema is None else {k: 0.9 * ema[k] + 0.1 * weights[k] for k in weights}
    saved = load_file(straight / "ema" / "unet" / "diffusion_pytorch_model.safetensors")
    for name in saved:
        torch.testing.assert_close(saved[name], ema[name], rtol=1e-5, atol=1e-6)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    run_training(*flags, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    for sub in ("unet", "ema/unet"):
        a = load_file(straight / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / sub / "diffusion_pytorch_model.safetensors")
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{sub}: {name}")
