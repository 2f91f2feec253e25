"""Train an unconditional DDPM toward flat minima: SAM/ASAM, SWA, EMA and input perturbation, under `accelerate`.

    accelerate launch training_scripts/train_flat_ddpm.py --sam_rho 0.1
    accelerate launch training_scripts/train_flat_ddpm.py @recipes/paper-cifar10.txt --sam_rho 0.1  # the paper's ADM

`@file` reads flags from a file (recipes/ holds the paper's, one per dataset); flags after it override it.
Flags that exist in diffusers' `examples/unconditional_image_generation/train_unconditional.py` keep their names
and meanings; docs/training.md lists the defaults that differ (they suit the embedded digits, the default dataset).
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import datasets
import diffusers
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from tqdm.auto import tqdm

from diffusers_flat.data.images import ImageTransform, load_image_dataset, subset_indices
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.hub.push import push_to_hub
from diffusers_flat.methods.averaging import make_ema, make_swa, resolve_swa_start, swa_due
from diffusers_flat.methods.sam import ASAM_ETA, SAM
from diffusers_flat.methods.sam_modes import sam_mode
from diffusers_flat.methods.timestep_sampler import LossSecondMomentSampler, importance_weights
from diffusers_flat.metrics.flatness_log import FlatnessLog
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.training.arguments import check_args, training_parser
from diffusers_flat.training.checkpointing import resume_training, run_record, save_checkpoint, save_outputs, start_run
from diffusers_flat.training.models import build_scheduler, build_unet, make_noise_unconditional
from diffusers_flat.training.sample_stream import StepBatchSampler, TrainingImages
from diffusers_flat.training.step import (
    check_finite,
    draw_step_noise,
    rank_micro_batches,
    seed_dropout,
    train_step,
)
from diffusers_flat.utils.cli import run_main, share_cpu_threads
from diffusers_flat.utils.processes import leave_without_teardown

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser(description=__doc__.splitlines()[0]).parse_args(argv)


def main(args: argparse.Namespace) -> None:
    check_args(args)

    # Without GPUs, `cpu=True` makes `accelerate launch --multi_gpu --num_processes N` (or torchrun) start N real
    # gloo processes; without it each process would train alone.
    logs = ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, args.logging_dir))
    cpu, precision = not torch.cuda.is_available(), args.mixed_precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, log_with=args.logger, project_config=logs)
    if accelerator.device.type == "cpu":
        share_cpu_threads(accelerator.num_processes, args.num_cpu_threads)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    # Everything below up to start_run only reads and checks.
    with accelerator.main_process_first():
        dataset, data_channels = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.image_column,
            args.cache_dir,
            split=args.dataset_split,
        )
    if args.train_subset is not None:  # the first N of a fixed random order: subsets of one seed are nested
        dataset = dataset.select(subset_indices(len(dataset), args.train_subset, args.train_subset_seed))
    torch.manual_seed(args.seed)
    model = build_unet(args.model_config_name_or_path, args.resolution, data_channels, learn_sigma=args.learn_sigma)
    if args.noise_unconditional:  # blind to t: the time embedding's first layer is zero and frozen
        make_noise_unconditional(model)
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    noise_scheduler = build_scheduler(
        args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type, args.learn_sigma, args.timestep_spacing
    )

    world_size, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    samples_per_step = args.train_batch_size * world_size * accumulation
    steps_per_epoch = math.ceil(len(dataset) / samples_per_step)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    swa_start = resolve_swa_start(args.swa_start, max_train_steps) if args.use_swa else None

    # The last check; nothing has been written so far. From here on the run owns output_dir.
    run = RunDirectory(args.output_dir)
    resume_from = start_run(run, args.resume_from_checkpoint, args.overwrite_output_dir, accelerator.is_main_process)

    betas, decay = (args.adam_beta1, args.adam_beta2), args.adam_weight_decay
    optimizer = torch.optim.AdamW(model.parameters(), args.learning_rate, betas, args.adam_epsilon, decay)
    # Stepped once per optimizer step, by us: accelerate's wrapper would step it once per process.
    warmup, total = args.lr_warmup_steps, max_train_steps
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    unet = accelerator.unwrap_model(model)
    sam = None
    if args.sam_rho > 0:  # SAM, or one of its cheaper modes (methods/sam_modes.py)
        sam_start = round(args.sam_start * max_train_steps) if args.sam_mode == "late" else 0
        looksam = {"looksam_alpha": args.looksam_alpha} if args.sam_mode == "looksam" else {}
        sam = sam_mode(
            # --asam_eta 0 is ASAM with T_w = |w| exactly: only an absent flag takes the default
            SAM(
                unet.named_parameters(),
                args.sam_rho,
                args.sam_adaptive,
                ASAM_ETA if args.asam_eta is None else args.asam_eta,
            ),
            args.sam_mode,
            every=args.sam_every or 1,
            start_step=sam_start,
            seed=args.seed,
            **looksam,
        )
    ema_decay = (args.ema_max_decay, args.ema_inv_gamma, args.ema_power, not args.ema_constant_decay)
    ema = make_ema(unet, *ema_decay) if args.use_ema else None
    swa = make_swa(unet) if args.use_swa else None
    averages = {name: avg for name, avg in (("ema", ema), ("swa", swa)) if avg is not None}
    adaptive_t = args.timestep_sampler == "loss-second-moment"
    timestep_sampler = LossSecondMomentSampler(args.ddpm_num_steps) if adaptive_t else None
    registered = [lr_scheduler, *averages.values()] + ([timestep_sampler] if timestep_sampler else [])
    registered += [sam] if sam is not None and sam.keeps_state else []  # e.g. LookSAM's stored component
    accelerator.register_for_checkpointing(*registered)
    checkpoint_info = {"averages": list(averages), "timestep_sampler": args.timestep_sampler}
    checkpoint_info["sam_mode"] = args.sam_mode

    global_step = 0
    if resume_from is not None:
        global_step = resume_training(accelerator, resume_from, checkpoint_info, ema)
        logger.info(f"Resumed from {resume_from} at step {global_step}")
    if accelerator.is_main_process:
        resolved = {"max_train_steps": max_train_steps, "swa_start_step": swa_start}
        resolved |= {"total_batch_size": samples_per_step, "dataset_size": len(dataset)}
        run.write_record(run_record(args, accelerator, unet, **resolved))
        accelerator.init_trackers("train_flat_ddpm")

    # Each step's images are a pure function of (seed, step): a resumed run reads what a straight one would.
    channels = unet.config.in_channels
    steps = {"num_steps": max_train_steps, "start_step": global_step, "accumulation_steps": accumulation}
    rank = {"world_size": world_size, "rank": accelerator.process_index}
    sampler = StepBatchSampler(len(dataset), args.train_batch_size, seed=args.seed, **steps, **rank)
    transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, channels)
    images = TrainingImages(dataset, args.image_column, transform)
    train_dataloader = torch.utils.data.DataLoader(
        images, batch_sampler=sampler, num_workers=args.dataloader_num_workers
    )

    logger.info(f"***** Running training *****\n  Num examples = {len(dataset)}, processes = {world_size}")
    logger.info(f"  Total batch size = {samples_per_step}, steps = {max_train_steps} ({steps_per_epoch} per epoch)")
    sam_kind = f"{args.sam_rho}{' (adaptive)' if args.sam_adaptive else ''}, mode {args.sam_mode}"
    logger.info(f"  SAM rho={sam_kind}, IP gamma={args.input_perturbation}, EMA={args.use_ema}, SWA={args.use_swa}")

    def save(samples_name: str | None) -> None:
        """Save the pipelines (trained, EMA, SWA) and, if named, a sample grid of each (also to TensorBoard)."""
        sampling = (args.eval_batch_size, args.ddpm_num_inference_steps, args.seed)
        samples = save_outputs(run, unet, averages, noise_scheduler, samples_name, *sampling)
        if args.logger == "tensorboard":
            for variant, grid in samples.items():
                tag, writer = "model" if variant == "raw" else variant, accelerator.get_tracker("tensorboard").writer
                writer.add_images(f"samples/{tag}", grid.transpose(0, 3, 1, 2), global_step)

    flatness = None
    if args.flatness_every and accelerator.is_main_process:
        # Flatness during training: LPF of the first images of the dataset (centre crop, no flip), fixed triples.
        fixed = ImageTransform(args.resolution, center_crop=True, random_flip=False, channels=channels)
        count = min(args.flatness_samples, len(dataset))
        images_of_log = torch.stack([TrainingImages(dataset, args.image_column, fixed)[(i, 0)] for i in range(count)])
        flatness = FlatnessLog(
            run, noise_scheduler, images_of_log, args.flatness_draws, seed=args.seed, start_step=global_step
        )

    quiet = not accelerator.is_local_main_process
    progress_bar = tqdm(total=max_train_steps, initial=global_step, desc="Steps", disable=quiet)
    sample_shape = (channels, args.resolution, args.resolution)
    step_options = {"sam_ascent": args.sam_ascent, "max_grad_norm": args.max_grad_norm}
    step_options["gather_sample_losses"] = timestep_sampler is not None  # the sampler learns from every loss
    micro_batch_iterator = iter(train_dataloader)
    model.train()
    while global_step < max_train_steps:
        # ADM's timestep sampler: t ~ p_t with p_t proportional to sqrt(E[L_t^2]), each loss weighted 1 / (T p_t).
        p = timestep_sampler.probabilities() if timestep_sampler else None
        # IP: the step's noise eps comes with gamma xi, xi ~ N(0, I): the network sees eps + gamma xi, the target eps.
        noise, timesteps, perturbation = draw_step_noise(
            args.seed, global_step, samples_per_step, sample_shape, args.ddpm_num_steps, args.input_perturbation, p
        )
        weights = None if p is None else importance_weights(p, timesteps)
        seed_dropout(args.seed, global_step, accelerator.process_index)
        step_noise = (noise, timesteps, perturbation, weights)
        batches = rank_micro_batches(
            micro_batch_iterator, step_noise, args.train_batch_size, accumulation, accelerator
        )
        # SAM: the gradient at w gives e(g); the step ascends to w + e, takes the descent gradient there, comes back
        # to w and lets AdamW step with it (`sam_ascent`: from the all-reduced or each rank's own gradient). The
        # cheaper modes take that second pass on some steps only, or one pass at a perturbation known beforehand.
        stats = train_step(
            accelerator, model, optimizer, noise_scheduler, batches, sam=sam, step=global_step, **step_options
        )
        check_finite(stats, global_step + 1, run)  # a diverged run stops before anything is saved from it
        if timestep_sampler is not None:
            timestep_sampler.update(stats.timesteps, stats.sample_losses)
        lr_scheduler.step()
        global_step += 1
        if ema is not None:  # EMA: w_ema <- d w_ema + (1 - d) w, the decay d warming up to ema_max_decay
            ema.step(unet.parameters())
        if swa is not None and swa_due(global_step, swa_start, args.swa_cycle):  # SWA: the running mean of w
            swa.update_parameters(unet)

        logs = {"loss": stats.loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": stats.grad_norm}
        logs |= {"sam_sharpness": stats.sharpness, "ema_decay": ema.cur_decay_value if ema else None}
        accelerator.log({name: value for name, value in logs.items() if value is not None}, step=global_step)
        if flatness is not None and global_step % args.flatness_every == 0:
            accelerator.log(flatness.measure(unet, global_step, stats.sharpness), step=global_step)
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{logs['lr']:.2e}")

        if global_step % args.checkpointing_steps == 0:
            limit = args.checkpoints_total_limit
            logger.info(f"Saved {save_checkpoint(accelerator, run.path, global_step, checkpoint_info, limit)}")

        epoch = global_step * samples_per_step // len(dataset)
        epoch_ended = epoch > (global_step - 1) * samples_per_step // len(dataset)
        if epoch_ended and global_step < max_train_steps:
            save_images = epoch % args.save_images_epochs == 0
            if accelerator.is_main_process and (save_images or epoch % args.save_model_epochs == 0):
                save(f"step-{global_step:06d}" if save_images else None)
            accelerator.wait_for_everyone()
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save(f"step-{global_step:06d}")
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
