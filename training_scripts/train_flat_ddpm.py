"""Train an unconditional DDPM toward flat minima: SAM/ASAM, SWA, EMA and input perturbation, under `accelerate`.

    accelerate launch training_scripts/train_flat_ddpm.py --sam_rho 0.1
    accelerate launch training_scripts/train_flat_ddpm.py @recipes/paper-cifar10.txt --sam_rho 0.1  # the paper's ADM

`@file` reads flags from a file (recipes/ holds the paper's, one per dataset); flags after it override it.
Flags that exist in diffusers' `examples/unconditional_image_generation/train_unconditional.py` keep their names
and meanings; the README lists the defaults that differ (they suit the embedded digits, the default dataset).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
from pathlib import Path

import datasets
import diffusers
import huggingface_hub
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from tqdm.auto import tqdm

from diffusers_flat import __version__
from diffusers_flat.errors import FlatError
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.hub.push import push_to_hub
from diffusers_flat.methods.averaging import averaged_unet, make_ema, make_swa, resolve_swa_start, swa_due
from diffusers_flat.methods.sam import SAM, check_rho
from diffusers_flat.methods.timestep_sampler import TIMESTEP_SAMPLERS, LossSecondMomentSampler, importance_weights
from diffusers_flat.run_directory import RunDirectory, remove_entry
from diffusers_flat.training.checkpointing import read_training_state, save_checkpoint, save_pipeline
from diffusers_flat.training.data import (
    ImageTransform,
    StepBatchSampler,
    TrainingImages,
    load_image_dataset,
    subset_indices,
)
from diffusers_flat.training.models import PRESETS, build_unet, make_noise_unconditional
from diffusers_flat.training.step import (
    SAM_ASCENT_MODES,
    MicroBatch,
    draw_step_noise,
    leave_without_teardown,
    seed_dropout,
    train_step,
)
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, run_main, share_cpu_threads
from diffusers_flat.utils.sampling import image_grid, sample_images

logger = get_logger(__name__, log_level="INFO")


class TrainingDiverged(FlatError):
    """The loss stopped being a finite number."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0], fromfile_prefix_chars="@")
    # Data
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A dataset on the Hub, or a local dataset directory. With neither this nor --train_data_dir: the "
        "embedded scikit-learn digits.",
    )
    parser.add_argument(
        "--dataset_config_name", type=str, default=None, help="The dataset's config, if it has several."
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images (imagefolder layout). Ignored if --dataset_name is given.",
    )
    parser.add_argument("--image_column", type=str, default="image", help="The dataset column holding the images.")
    parser.add_argument(
        "--train_subset",
        type=int,
        default=None,
        help="Train on this many images of the dataset, a fixed random subset (nested: the 32 are among the 128).",
    )
    parser.add_argument("--train_subset_seed", type=int, default=0, help="Which random subset --train_subset takes.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are stored.")
    parser.add_argument("--resolution", type=int, default=16, help="Images are resized and cropped to this size.")
    parser.add_argument("--center_crop", action="store_true", help="Crop at the centre instead of at random.")
    parser.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Subprocesses for loading data.")
    # Model and diffusion
    parser.add_argument(
        "--model_config_name_or_path",
        type=str,
        default="tiny",
        help=f"A UNet2DModel config file or directory, or a preset: {', '.join(PRESETS)}.",
    )
    parser.add_argument(
        "--noise_unconditional",
        action="store_true",
        help="Train a UNet blind to the noise level (its time embedding a learned constant), the learned counterpart "
        "of the empirical denoiser's noise-unconditional variant.",
    )
    parser.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps T of training.")
    parser.add_argument(
        "--ddpm_num_inference_steps", type=int, default=100, help="Respaced DDPM steps for the sample grids."
    )
    parser.add_argument(
        "--ddpm_beta_schedule",
        type=str,
        default="linear",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"],
    )
    parser.add_argument(
        "--prediction_type", type=str, default="epsilon", choices=["epsilon", "sample", "v_prediction"]
    )
    parser.add_argument(
        "--learn_sigma",
        action="store_true",
        help="Learn the variance (twice the channels out) with the hybrid loss L_simple + L_vlb (Nichol & Dhariwal; "
        "the paper's ADM); plain diffusers samples it through the scheduler's variance_type learned_range.",
    )
    parser.add_argument(
        "--timestep_sampler",
        type=str,
        default="uniform",
        choices=TIMESTEP_SAMPLERS,
        help="How training draws t: uniform, or loss-second-moment importance sampling (ADM, with --learn_sigma).",
    )
    parser.add_argument(
        "--timestep_spacing",
        type=str,
        default="linspace",
        choices=["linspace", "leading", "trailing"],
        help="Which timesteps respaced sampling keeps, saved in the pipeline's scheduler. linspace: 999, ..., 0 as "
        "guided-diffusion's respacing (the paper's sampler); leading is diffusers' default.",
    )
    # Optimisation
    parser.add_argument("--train_batch_size", type=int, default=32, help="Batch size per process.")
    parser.add_argument("--eval_batch_size", type=int, default=64, help="Images in each sample grid.")
    parser.add_argument("--num_epochs", type=int, default=15, help="Ignored if --max_train_steps is set.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_epochs.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=50)
    parser.add_argument("--adam_beta1", type=float, default=0.95)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping bound; 0 turns it off.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the model, the data order and the noise.")
    parser.add_argument(
        "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="bf16 works with SAM."
    )
    parser.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    parser.add_argument(
        "--num_cpu_threads",
        type=int,
        default=None,
        help="Torch threads per process when training on CPU (default: the cores divided among the processes; "
        "`accelerate launch` would otherwise leave one).",
    )
    # Flat-minima methods
    parser.add_argument("--sam_rho", type=float, default=0.0, help="SAM neighbourhood radius rho; 0 turns SAM off.")
    parser.add_argument("--sam_adaptive", action="store_true", help="Adaptive SAM (ASAM): scale e by |w|.")
    parser.add_argument(
        "--sam_ascent",
        type=str,
        default="global",
        choices=SAM_ASCENT_MODES,
        help="Across processes, perturb along the all-reduced gradient (global) or each process's own (local, "
        "m-sharpness, no extra all-reduce).",
    )
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights, saved in output_dir/ema.")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0, help="The inverse gamma of the EMA warm-up.")
    parser.add_argument("--ema_power", type=float, default=3 / 4, help="The power of the EMA warm-up.")
    parser.add_argument("--ema_max_decay", type=float, default=0.9999, help="The maximum EMA decay.")
    parser.add_argument(
        "--ema_constant_decay",
        action="store_true",
        help="EMA at --ema_max_decay from the start, without warm-up (guided-diffusion's ema_rate, the paper's).",
    )
    parser.add_argument("--use_swa", action="store_true", help="Keep an SWA average, saved in output_dir/swa.")
    parser.add_argument(
        "--swa_start",
        type=float,
        default=0.9,
        help="First SWA step: a step number, or a fraction of training if below 1 (paper: 180K of 200K).",
    )
    parser.add_argument("--swa_cycle", type=int, default=100, help="Average every this many steps (paper: 100).")
    parser.add_argument(
        "--input_perturbation", type=float, default=0.0, help="DDPM-IP gamma: train on eps + gamma*xi (paper: 0.1)."
    )
    # Output, logging, checkpoints
    parser.add_argument("--output_dir", type=str, default="ddpm-flat-digits")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Start afresh in an output dir that holds a run."
    )
    parser.add_argument("--save_images_epochs", type=int, default=10, help="Sample grid every this many epochs.")
    parser.add_argument("--save_model_epochs", type=int, default=10, help="Save the pipeline every this many epochs.")
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    parser.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help='A checkpoint name or path, or "latest".'
    )
    parser.add_argument("--logger", type=str, default="tensorboard", choices=["tensorboard", "wandb"])
    parser.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    # The Hub
    parser.add_argument("--push_to_hub", action="store_true", help="Push the pipeline(s) and card at the end.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Repo to push to; default: output dir name.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the repo private.")
    parser.add_argument("--hub_token", type=str, default=None, help="Write token; default: stored login or HF_TOKEN.")
    parser.add_argument(
        "--model_card_template",
        type=str,
        default=None,
        help="A Jinja model card template of your own (see model_cards/); default: the one diffusers_flat ships.",
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that cannot work, before anything is loaded or written."""
    positive = [
        "resolution",
        "train_batch_size",
        "eval_batch_size",
        "gradient_accumulation_steps",
        "ddpm_num_steps",
        "ddpm_num_inference_steps",
        "num_epochs",
        "save_images_epochs",
        "save_model_epochs",
        "checkpointing_steps",
    ]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit", "num_cpu_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_rho(args.sam_rho)
    if not args.input_perturbation >= 0:
        raise UsageError(f"--input_perturbation must be >= 0 (paper: 0.1), got {args.input_perturbation}")
    if args.swa_cycle < 1:
        raise UsageError(f"--swa_cycle must be >= 1 (paper: 100), got {args.swa_cycle}")
    if args.model_card_template and not Path(args.model_card_template).is_file():
        raise UsageError(f"--model_card_template: no file {args.model_card_template}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.sam_rho > 0 and args.mixed_precision == "fp16":
        raise UsageError(
            "--mixed_precision fp16 cannot be combined with --sam_rho: loss scaling does not survive SAM's two "
            "passes; use --mixed_precision bf16 or no"
        )
    if args.push_to_hub and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(
            "--push_to_hub: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it or push later "
            "with training_scripts/push_to_hub.py"
        )
    if args.hub_token and args.logger == "wandb":
        raise UsageError(
            "--hub_token cannot be combined with --logger wandb: the token would be logged; use "
            "`hf auth login` instead"
        )
    if args.learn_sigma and args.prediction_type != "epsilon":
        raise UsageError(f"--learn_sigma needs --prediction_type epsilon, got {args.prediction_type}")
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        raise UsageError(
            f"--ddpm_num_inference_steps ({args.ddpm_num_inference_steps}) cannot exceed --ddpm_num_steps "
            f"({args.ddpm_num_steps})"
        )


def check_output_dir(run: RunDirectory, overwrite: bool) -> None:
    """Refuse to start a fresh run on top of another one unless asked to."""
    if run.path.exists() and not run.path.is_dir():
        raise UsageError(f"--output_dir: '{run.path}' exists and is not a directory")
    if run.holds_run() and not overwrite:
        raise UsageError(
            f"--output_dir '{run.path}' already holds a run; pass --resume_from_checkpoint latest to continue it or "
            "--overwrite_output_dir to replace it"
        )


def main(args: argparse.Namespace) -> None:
    check_args(args)

    # Without GPUs, `cpu=True` makes `accelerate launch --multi_gpu --num_processes N` (or torchrun) start N real
    # gloo processes; without it each process would train alone.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=args.logger,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    if accelerator.device.type == "cpu":
        share_cpu_threads(accelerator.num_processes, args.num_cpu_threads)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    # Everything below up to "Nothing has been written" only reads and checks.
    with accelerator.main_process_first():
        dataset, data_channels = load_image_dataset(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column, args.cache_dir
        )
    if args.train_subset is not None:  # the first N of a fixed random order: subsets of one seed are nested
        dataset = dataset.select(subset_indices(len(dataset), args.train_subset, args.train_subset_seed))
    torch.manual_seed(args.seed)
    model = build_unet(args.model_config_name_or_path, args.resolution, data_channels, learn_sigma=args.learn_sigma)
    if args.noise_unconditional:  # blind to t: the time embedding's first layer is zero and frozen
        make_noise_unconditional(model)
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        # A learned variance v in [-1, 1] interpolates log beta~_t and log beta_t, as the hybrid loss trains it.
        variance_type="learned_range" if args.learn_sigma else "fixed_small",
        # The paper's sampler (guided-diffusion's respacing) keeps round(k (T - 1) / (T' - 1)): 999, 946, ..., 0.
        timestep_spacing=args.timestep_spacing,
    )

    world_size = accelerator.num_processes
    samples_per_step = args.train_batch_size * world_size * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(dataset) / samples_per_step)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    swa_start = resolve_swa_start(args.swa_start, max_train_steps) if args.use_swa else None

    run = RunDirectory(args.output_dir)
    resume_from = None
    if args.resume_from_checkpoint:
        resume_from = run.resolve_checkpoint(args.resume_from_checkpoint)
        if resume_from is None:
            logger.warning(f"No checkpoint in {args.output_dir} yet: starting a new training run.")
    if resume_from is None:
        check_output_dir(run, args.overwrite_output_dir)

    # Nothing has been written so far. From here on the run owns output_dir.
    if accelerator.is_main_process and resume_from is None and args.overwrite_output_dir:
        for stale in run.checkpoints():
            remove_entry(stale)
    os.makedirs(args.output_dir, exist_ok=True)

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # Stepped once per optimizer step, by us: accelerate's wrapper would step it once per process.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_train_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unet = accelerator.unwrap_model(model)
    sam = SAM(unet.parameters(), rho=args.sam_rho, adaptive=args.sam_adaptive) if args.sam_rho > 0 else None
    ema = None
    if args.use_ema:
        ema = make_ema(unet, args.ema_max_decay, args.ema_inv_gamma, args.ema_power, not args.ema_constant_decay)
    swa = make_swa(unet) if args.use_swa else None
    averages = {name: avg for name, avg in (("ema", ema), ("swa", swa)) if avg is not None}
    timestep_sampler = None
    if args.timestep_sampler == "loss-second-moment":
        timestep_sampler = LossSecondMomentSampler(args.ddpm_num_steps)
    registered = [lr_scheduler, *averages.values()] + ([timestep_sampler] if timestep_sampler else [])
    accelerator.register_for_checkpointing(*registered)
    checkpoint_info = {"averages": list(averages), "timestep_sampler": args.timestep_sampler}

    global_step = 0
    if resume_from is not None:
        state = read_training_state(resume_from)
        saved = {"averages": state.get("averages", []), "timestep_sampler": state.get("timestep_sampler", "uniform")}
        if saved != checkpoint_info:
            raise UsageError(
                f"--resume_from_checkpoint: {resume_from.name} was saved with {saved} but this run has "
                f"{checkpoint_info}; resume with the same --use_ema/--use_swa/--timestep_sampler flags"
            )
        accelerator.load_state(str(resume_from))
        if ema is not None:
            # accelerate loads registered objects onto the CPU and EMAModel keeps them there: back to the model's
            # device, as diffusers' train_unconditional.py does.
            ema.to(accelerator.device)
        global_step = state["global_step"]
        logger.info(f"Resumed from {resume_from} at step {global_step}")

    if accelerator.is_main_process:
        resolved = {
            **{k: v for k, v in vars(args).items() if k != "hub_token"},  # a secret: never on disk, never pushed
            # an absolute path: the card is refreshed later from wherever evaluate_flat.py runs
            "model_card_template": args.model_card_template and str(Path(args.model_card_template).resolve()),
            "max_train_steps": max_train_steps,
            "swa_start_step": swa_start,
            "num_processes": world_size,
            "mixed_precision": accelerator.mixed_precision,
            "total_batch_size": samples_per_step,
            "dataset_size": len(dataset),
            "num_parameters": sum(p.numel() for p in unet.parameters()),
            "versions": {
                "diffusers_flat": __version__,
                "diffusers": diffusers.__version__,
                "torch": torch.__version__,
            },
            "python": platform.python_version(),
        }
        run.write_record(resolved)
        accelerator.init_trackers("train_flat_ddpm")

    channels = unet.config.in_channels
    sampler = StepBatchSampler(
        len(dataset),
        args.train_batch_size,
        seed=args.seed,
        num_steps=max_train_steps,
        start_step=global_step,
        accumulation_steps=args.gradient_accumulation_steps,
        world_size=world_size,
        rank=accelerator.process_index,
    )
    train_dataloader = torch.utils.data.DataLoader(
        TrainingImages(
            dataset, args.image_column, ImageTransform(args.resolution, args.center_crop, args.random_flip, channels)
        ),
        batch_sampler=sampler,
        num_workers=args.dataloader_num_workers,
    )

    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(dataset)}")
    logger.info(f"  Num processes = {world_size}")
    logger.info(f"  Total batch size (w. parallel & accumulation) = {samples_per_step}")
    logger.info(f"  Total optimization steps = {max_train_steps} ({steps_per_epoch} per epoch)")
    logger.info(
        f"  Methods: SAM rho={args.sam_rho}{' (adaptive)' if args.sam_adaptive else ''}, "
        f"IP gamma={args.input_perturbation}, EMA={args.use_ema}, SWA={args.use_swa}"
    )

    def save_outputs(samples_name: str | None) -> None:
        """Save the pipelines (trained, EMA, SWA) and, if named, a sample grid of each."""
        for variant, weights in [("raw", unet)] + [(name, averaged_unet(unet, avg)) for name, avg in averages.items()]:
            if variant == "swa" and swa.n_averaged.item() == 0:
                continue
            save_pipeline(weights, noise_scheduler, run.pipeline_path(variant))
            if samples_name is not None:
                images = sample_images(
                    weights,
                    noise_scheduler,
                    args.eval_batch_size,
                    args.ddpm_num_inference_steps,
                    seed=args.seed,
                    show_progress=False,
                )
                grid = image_grid(images)
                run.samples_path(variant).mkdir(exist_ok=True)
                grid.save(run.samples_path(variant) / f"{samples_name}.png")
                grid.save(run.sample_grid_path(variant))
                if args.logger == "tensorboard":
                    writer = accelerator.get_tracker("tensorboard").writer
                    tag = "model" if variant == "raw" else variant
                    writer.add_images(f"samples/{tag}", images.transpose(0, 3, 1, 2), global_step)

    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    sample_shape = (channels, args.resolution, args.resolution)
    micro_batch_iterator = iter(train_dataloader)
    model.train()
    while global_step < max_train_steps:
        # ADM's timestep sampler: t ~ p_t with p_t proportional to sqrt(E[L_t^2]), each loss weighted 1 / (T p_t).
        p = timestep_sampler.probabilities() if timestep_sampler else None
        noise, timesteps, perturbation = draw_step_noise(
            args.seed, global_step, samples_per_step, sample_shape, args.ddpm_num_steps, args.input_perturbation, p
        )
        weights = None if p is None else importance_weights(p, timesteps)
        seed_dropout(args.seed, global_step, accelerator.process_index)
        micro_batches = []
        for j in range(args.gradient_accumulation_steps):
            start = (j * world_size + accelerator.process_index) * args.train_batch_size  # as StepBatchSampler
            rows = slice(start, start + args.train_batch_size)
            micro_batches.append(
                MicroBatch(
                    clean=next(micro_batch_iterator).to(accelerator.device),
                    noise=noise[rows].to(accelerator.device),
                    timesteps=timesteps[rows].to(accelerator.device),
                    perturbation=None if perturbation is None else perturbation[rows].to(accelerator.device),
                    weights=None if weights is None else weights[rows].to(accelerator.device),
                )
            )
        stats = train_step(
            accelerator,
            model,
            optimizer,
            noise_scheduler,
            micro_batches,
            sam=sam,
            sam_ascent=args.sam_ascent,
            max_grad_norm=args.max_grad_norm,
            gather_sample_losses=timestep_sampler is not None,
        )
        if not math.isfinite(stats.loss) or not math.isfinite(stats.sharpness or 0.0):
            kept = run.checkpoints()
            raise TrainingDiverged(
                f"the loss became {stats.loss} at step {global_step + 1}; stopped without saving. "
                f"Last good checkpoint: {kept[-1] if kept else 'none'}. Try a lower --learning_rate or --sam_rho"
            )
        if timestep_sampler is not None:
            timestep_sampler.update(stats.timesteps, stats.sample_losses)
        lr_scheduler.step()
        global_step += 1
        if ema is not None:
            ema.step(unet.parameters())
        if swa is not None and swa_due(global_step, swa_start, args.swa_cycle):
            swa.update_parameters(unet)

        logs = {"loss": stats.loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": stats.grad_norm}
        if stats.sharpness is not None:
            logs["sam_sharpness"] = stats.sharpness
        if ema is not None:
            logs["ema_decay"] = ema.cur_decay_value
        accelerator.log(logs, step=global_step)
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{logs['lr']:.2e}")

        if global_step % args.checkpointing_steps == 0:
            path = save_checkpoint(
                accelerator, args.output_dir, global_step, checkpoint_info, args.checkpoints_total_limit
            )
            logger.info(f"Saved state to {path}")

        epoch = global_step * samples_per_step // len(dataset)
        epoch_ended = epoch > (global_step - 1) * samples_per_step // len(dataset)
        if epoch_ended and global_step < max_train_steps:
            save_images = epoch % args.save_images_epochs == 0
            if accelerator.is_main_process and (save_images or epoch % args.save_model_epochs == 0):
                save_outputs(f"step-{global_step:06d}" if save_images else None)
            accelerator.wait_for_everyone()
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(f"step-{global_step:06d}")
        write_model_card(args.output_dir, args.hub_model_id)
        logger.info(f"Saved the pipeline{'s' if averages else ''}, sample grids and model card to {args.output_dir}")
    # All processes leave together: a gloo process group torn down while its peer is still busy can hang forever.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = args.hub_model_id or run.name
        url = push_to_hub(args.output_dir, repo_id, private=args.hub_private_repo, token=args.hub_token)
        logger.info(f"Pushed {args.output_dir} to {url}")
    leave_without_teardown(accelerator)


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, train, and report bad input as one line naming the flag (exit status 1)."""
    flags = {"rho": "--sam_rho", "config": "--model_config_name_or_path", "checkpoint": "--resume_from_checkpoint"}
    run_main(main, parse_args(argv), (HfHubHTTPError, OfflineModeIsEnabled), flags)


if __name__ == "__main__":
    cli()
