"""The training script end to end: the paper's grid, outputs loading in plain diffusers, SWA/EMA contents, resume,
bad input."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import train_flat_ddpm
from conftest import GRID, GRID_STEPS, micro_args, run_cli, run_command, run_training, train_here
from safetensors.torch import load_file

LOAD_IN_PLAIN_DIFFUSERS = """
import sys
import numpy as np
from diffusers import DDPMPipeline
for path in sys.argv[1:]:
    pipe = DDPMPipeline.from_pretrained(path)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape[0] == 2 and np.isfinite(images).all(), path
assert not any(name.startswith("diffusers_flat") for name in sys.modules)
print("loaded", len(sys.argv) - 1)
"""


def unet_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "unet" / "diffusion_pytorch_model.safetensors")


def checkpoint_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.mark.slow
def test_every_grid_row_trains_and_loads_in_plain_diffusers(grid_runs):
    pipelines = []
    for name, out in grid_runs.items():
        args = json.loads((out / "training_args.json").read_text())
        assert args["max_train_steps"] == GRID_STEPS[name] and args["num_processes"] == 1
        assert (out / "sample_grid.png").is_file()
        pipelines.append(out)
        for sub in ("ema", "swa"):
            assert (out / sub / "model_index.json").is_file() == (f"--use_{sub}" in GRID[name])
            if f"--use_{sub}" in GRID[name]:
                pipelines.append(out / sub)
    assert len(pipelines) == 10  # the nine rows and the plain run
    result = run_command([sys.executable, "-c", LOAD_IN_PLAIN_DIFFUSERS, *map(str, pipelines)], Path("/"), 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {len(pipelines)}" in result.stdout


@pytest.fixture
def averaged_run(grid_runs) -> Path:
    """The grid's +SAM run: 6 steps with a checkpoint after each, SWA from step 2 every 2 steps, EMA with its
    warm-up."""
    return grid_runs["+SAM"]


@pytest.fixture
def finished_run(grid_runs) -> Path:
    """The grid's plain run (2 steps, a checkpoint after each), which bad input must leave alone."""
    return grid_runs["plain"]


@pytest.mark.slow
def test_swa_is_the_mean_of_its_snapshots(averaged_run):
    snapshots = [checkpoint_weights(averaged_run / f"checkpoint-{s}") for s in (2, 4, 6)]
    swa = unet_weights(averaged_run / "swa")
    for name, value in swa.items():
        torch.testing.assert_close(value, sum(s[name] for s in snapshots) / 3, rtol=1e-5, atol=1e-7)
    # and it is not simply the last weights
    assert any(not torch.allclose(swa[n], snapshots[-1][n]) for n in swa)


@pytest.mark.slow
def test_tensorboard_logs_loss_lr_grad_norm_and_sharpness(averaged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (averaged_run / "logs" / "train_flat_ddpm").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    for tag in ("loss", "lr", "grad_norm", "sam_sharpness", "ema_decay"):
        assert tag in scalars, tag
        assert [e.step for e in accumulator.Scalars(tag)] == [1, 2, 3, 4, 5, 6]
    assert accumulator.Tags()["images"]  # the final sample grids


@pytest.mark.slow
def test_ema_follows_the_warmup_formula(averaged_run):
    # diffusers' EMA with warm-up: at update n the decay is 1 - (1 + (n - 1) / inv_gamma) ** -power (0 at n = 1),
    # capped at ema_max_decay; ema <- decay * ema + (1 - decay) * w.
    ema = None
    for n in range(1, 7):
        weights = checkpoint_weights(averaged_run / f"checkpoint-{n}")
        decay = min(0.9999, 1 - (1 + (n - 1) / 1.0) ** -0.75) if n > 1 else 0.0
        ema = weights if ema is None else {k: decay * ema[k] + (1 - decay) * weights[k] for k in weights}
    saved = unet_weights(averaged_run / "ema")
    for name in saved:
        torch.testing.assert_close(saved[name], ema[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_resume_continues_as_if_never_stopped(tmp_path, micro_unet_config):
    flags = [
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--sam_rho",
        "0.1",
        "--use_swa",
        "--swa_start",
        "1",
        "--swa_cycle",
        "1",
        "--use_ema",
        "--input_perturbation",
        "0.1",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "1",
        "--random_flip",
    ]
    assert_resume_is_exact(tmp_path, micro_unet_config, flags, ("", "ema", "swa"))


def assert_resume_is_exact(tmp_path: Path, config: Path, flags: list[str], pipelines: tuple[str, ...]) -> None:
    """A 4-step run with a checkpoint at step 2, and a second one resumed from that checkpoint alone in a fresh
    process, end with the same weights bit for bit in each of `pipelines` ("" the model, "ema", "swa")."""
    straight = tmp_path / "straight"
    train_here(*micro_args(straight, config, *flags))
    # A second run that stops after step 2: only checkpoint-2 survives; it is resumed in a fresh process.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    result = run_training(*micro_args(resumed, config, *flags, "--resume_from_checkpoint", "latest"))
    assert "Resumed from" in result.stderr
    for sub in pipelines:
        a, b = unet_weights(straight / sub), unet_weights(resumed / sub)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{sub or 'model'}: {name}")
    assert (resumed / "checkpoint-4").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, options",
    [
        ("every", ["--sam_every", "3"]),
        ("looksam", ["--sam_every", "3"]),  # step 2 reuses the component kept at step 0: it must be saved
        ("momentum", []),
        ("late", ["--sam_start", "0.5"]),
        ("random", []),
    ],
)
def test_resume_is_exact_in_each_cheap_sam_mode(tmp_path, micro_unet_config, mode, options):
    flags = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--sam_rho", "0.1", "--sam_mode", mode, *options]
    assert_resume_is_exact(tmp_path, micro_unet_config, flags, ("",))


@pytest.mark.slow
def test_gradient_accumulation_matches_the_large_batch(tmp_path, micro_unet_config):
    # A large Adam epsilon keeps Adam from blowing float rounding in near-zero gradients up to a full step.
    common = ["--max_train_steps", "3", "--sam_rho", "0.1", "--max_grad_norm", "0", "--adam_epsilon", "1e-3"]
    big, small = tmp_path / "big", tmp_path / "accumulated"
    train_here(*micro_args(big, micro_unet_config, *common), "--train_batch_size", "12")
    run_training(
        *micro_args(small, micro_unet_config, *common), "--train_batch_size", "4", "--gradient_accumulation_steps", "3"
    )
    a, b = unet_weights(big), unet_weights(small)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


@pytest.mark.slow
def test_image_folder_run_with_sample_grids_every_epoch(tmp_path, micro_unet_config):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(10):  # RGB, non-square, odd sizes
        pixels = (torch.rand(11 + i, 13, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "run"
    run_training(
        *micro_args(
            out,
            micro_unet_config,
            "--train_data_dir",
            str(folder),
            "--train_batch_size",
            "5",
            "--num_epochs",
            "3",
            "--save_images_epochs",
            "1",
            "--random_flip",
        )
    )
    args = json.loads((out / "training_args.json").read_text())
    assert args["max_train_steps"] == 6 and args["dataset_size"] == 10
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-000002.png",
        "step-000004.png",
        "step-000006.png",
    ]
    assert Image.open(out / "sample_grid.png").size == (2 * 64 + 3 * 2,) * 2  # 4 images of 8x8, shown at 64x64
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 3


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    from datasets import Dataset

    path = tmp_path_factory.mktemp("texts") / "texts"
    Dataset.from_dict({"caption": ["a", "b"], "label": [0, 1]}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def empty_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("empty")


BAD_INPUTS = {
    "negative rho": (["--sam_rho", "-0.1"], "--sam_rho must be a number >= 0"),
    "text rho": (["--sam_rho", "abc"], "argument --sam_rho: invalid float value: 'abc'"),
    "swa past end": (["--use_swa", "--swa_start", "50"], "--swa_start 50 is past the end of training (2 steps)"),
    "swa cycle": (["--use_swa", "--swa_cycle", "0"], "--swa_cycle must be >= 1"),
    "negative ip": (["--input_perturbation", "-0.1"], "--input_perturbation must be >= 0"),
    "subset above the dataset": (
        ["--train_subset", "5000"],
        "--train_subset must be from 2 to the dataset's 1797 images, got 5000",
    ),
    "subset of one": (["--train_subset", "1"], "--train_subset must be from 2 to the dataset's 1797 images, got 1"),
    "missing dataset": (["--dataset_name", "./no/such/data"], "--dataset_name: path './no/such/data' does not exist"),
    "missing folder": (["--train_data_dir", "/no/such/folder"], "--train_data_dir: '/no/such/folder' is not"),
    "no image column": (["--dataset_name", "{text_dataset}"], "its columns are: caption, label"),
    "empty dataset": (["--train_data_dir", "{empty_folder}"], "holds no image files"),
    "bad resolution": (
        ["--resolution", "9"],
        "--resolution 9 does not fit this UNet: its 2 down blocks need a multiple of 2",
    ),
    "offline hub id": (
        ["--dataset_name", "someone/no-such-dataset"],
        "--dataset_name 'someone/no-such-dataset' is not a local path and could not be loaded from the Hub",
    ),
    "missing checkpoint": (["--resume_from_checkpoint", "checkpoint-99"], "no checkpoint 'checkpoint-99' in"),
    "unknown sam mode": (["--sam_rho", "0.1", "--sam_mode", "half"], "argument --sam_mode: invalid choice: 'half'"),
    "mode without rho": (["--sam_mode", "looksam"], "--sam_mode looksam needs --sam_rho > 0"),
    "every, unread": (
        ["--sam_rho", "0.1", "--sam_every", "3"],
        "--sam_every is read only by --sam_mode every or looksam, not full",
    ),
    "every of 0": (["--sam_rho", "0.1", "--sam_mode", "every", "--sam_every", "0"], "--sam_every must be >= 1, got 0"),
    "negative alpha": (
        ["--sam_rho", "0.1", "--sam_mode", "looksam", "--looksam_alpha", "-0.5"],
        "--looksam_alpha must be >= 0 (LookSAM: 0.7), got -0.5",
    ),
    "alpha, unread": (
        ["--sam_rho", "0.1", "--sam_mode", "every", "--looksam_alpha", "0.5"],
        "--looksam_alpha is read only by --sam_mode looksam, not every",
    ),
    "start of 1": (
        ["--sam_rho", "0.1", "--sam_mode", "late", "--sam_start", "1"],
        "--sam_start must be a fraction of training in [0, 1), got 1.0",
    ),
    "start, unread": (["--sam_rho", "0.1", "--sam_start", "0.5"], "--sam_start is read only by --sam_mode late"),
    "momentum without a moment": (
        ["--sam_rho", "0.1", "--sam_mode", "momentum", "--adam_beta1", "0"],
        "--sam_mode momentum reads Adam's first moment: --adam_beta1 must be > 0, got 0.0",
    ),
    "local looksam": (
        ["--sam_rho", "0.1", "--sam_mode", "looksam", "--sam_ascent", "local"],
        "--sam_ascent local needs --sam_mode full, every or late",
    ),
    "adaptive random": (
        ["--sam_rho", "0.1", "--sam_mode", "random", "--sam_adaptive"],
        "--sam_adaptive scales SAM's ascent, which --sam_mode random does not take",
    ),
    "unknown preset": (
        ["--model_config_name_or_path", "huge"],
        "'huge' is neither a preset (tiny, ddpm-cifar10, adm-cifar10, adm-64)",
    ),
    "missing card template": (["--model_card_template", "/no/card.md"], "--model_card_template: no file /no/card.md"),
    "unknown spacing": (["--timestep_spacing", "cosine"], "argument --timestep_spacing: invalid choice: 'cosine'"),
    "learned sigma, v": (
        ["--learn_sigma", "--prediction_type", "v_prediction"],
        "--learn_sigma needs --prediction_type epsilon, got v_prediction",
    ),
    "unknown sampler": (["--timestep_sampler", "importance"], "argument --timestep_sampler: invalid choice"),
}


def bad_input_args(case, finished_run, micro_unet_config, text_dataset, empty_folder) -> list[str]:
    flags = [f.format(text_dataset=text_dataset, empty_folder=empty_folder) for f in BAD_INPUTS[case][0]]
    # --overwrite_output_dir: even a run allowed to replace the old one must not touch it when its input is bad.
    return [*micro_args(finished_run, micro_unet_config, "--max_train_steps", "2", "--overwrite_output_dir"), *flags]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_keeps_outputs(
    case, finished_run, micro_unet_config, text_dataset, empty_folder, capsys
):
    """In this process, through the script's own cli(argv)."""
    before = tree_digest(finished_run)
    status, stderr = run_cli(
        train_flat_ddpm, bad_input_args(case, finished_run, micro_unet_config, text_dataset, empty_folder), capsys
    )
    assert status != 0
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and BAD_INPUTS[case][1] in errors[0], stderr[-2000:]
    assert tree_digest(finished_run) == before


@pytest.mark.slow
@pytest.mark.parametrize("case", ["text rho", "negative rho", "missing checkpoint"])
def test_bad_input_end_to_end(case, finished_run, micro_unet_config, text_dataset, empty_folder):
    """The same, as a user meets it: a fresh interpreter, one line on stderr, a non-zero exit."""
    before = tree_digest(finished_run)
    args = bad_input_args(case, finished_run, micro_unet_config, text_dataset, empty_folder)
    result = run_training(*args, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and BAD_INPUTS[case][1] in errors[0], result.stderr[-2000:]
    assert tree_digest(finished_run) == before


def test_an_existing_run_is_not_replaced_by_accident(finished_run, micro_unet_config, capsys):
    before = tree_digest(finished_run)
    status, stderr = run_cli(
        train_flat_ddpm, micro_args(finished_run, micro_unet_config, "--max_train_steps", "2"), capsys
    )
    assert status != 0 and "already holds a run" in stderr
    assert tree_digest(finished_run) == before


@pytest.mark.slow
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, micro_unet_config):
    out = tmp_path / "nan"
    flags = "--max_train_steps 5 --checkpointing_steps 1 --learning_rate 1e30 --lr_scheduler constant".split()
    result = run_training(*micro_args(out, micro_unet_config, *flags), check=False)
    assert result.returncode != 0
    assert "the loss became" in result.stderr and "Last good checkpoint:" in result.stderr
    kept = sorted(out.glob("checkpoint-*"))
    assert kept, "the checkpoint written before the loss diverged must survive"
    assert not (out / "model_index.json").exists()  # no pipeline saved from diverged weights
    state = json.loads((kept[-1] / "training_state.json").read_text())
    assert checkpoint_weights(kept[-1])  # loadable
    assert state["global_step"] == int(kept[-1].name.split("-")[1])


def test_script_help_lists_diffusers_flags(capsys):
    with pytest.raises(SystemExit):
        train_flat_ddpm.parse_args(["--help"])
    help_text = capsys.readouterr().out
    flags = """--dataset_name --train_data_dir --resolution --train_batch_size --learning_rate --lr_scheduler
        --lr_warmup_steps --gradient_accumulation_steps --mixed_precision --checkpointing_steps
        --checkpoints_total_limit --resume_from_checkpoint --logger --output_dir --ddpm_num_steps --ddpm_beta_schedule
        --prediction_type --use_ema --ema_max_decay --ema_inv_gamma --ema_power --max_train_steps --seed --image_column
        --model_config_name_or_path --sam_rho --sam_adaptive --use_swa --swa_start --swa_cycle --input_perturbation
        --model_card_template"""
    for flag in flags.split():
        assert flag in help_text, flag


def test_asam_eta_zero_is_honoured_not_replaced_by_the_default(tmp_path, micro_unet_config):
    # ASAM's T_w = |w| + eta: eta 0 leaves zero-initialised weights unperturbed, the default 0.01 does not, so one
    # step of each ends in other weights; an explicit 0.01 is the default itself. Trained in this process: the flag's
    # path from the command line to SAM.
    weights = {}
    for eta in ("0", "0.01", None):
        out = tmp_path / f"eta-{eta}"
        flags = ["--max_train_steps", "1", "--sam_rho", "0.5", "--sam_adaptive"]
        train_here(*micro_args(out, micro_unet_config, *flags, *(["--asam_eta", eta] if eta else [])))
        weights[eta] = unet_weights(out)
    differs = lambda a, b: any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert differs("0", None) and not differs("0.01", None)
