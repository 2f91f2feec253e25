"""What a study costs on this device: rates measured on the study's own model, and its projected hours.

    python benchmarks/study_cost.py --study studies/paper-cifar10.yaml --output rates.json [--device cuda]
    python training_scripts/run_study.py --study studies/paper-cifar10.yaml --output_dir x --dry_run --rates rates.json

Measures, on a freshly initialised UNet built from the study's training flags (its recipe included):
- optimizer steps per second at the study's batch size, gradient accumulation and mixed precision, plain and with
  SAM (`train_step`: forward, backward, AdamW; EMA and SWA updates and data loading are not timed),
- UNet image-forwards per second while sampling at the evaluation's batch size (a loss term costs the same forward),
- InceptionV3 images per second at the evaluation's FID batch size and dtype,
writes them to --output and prints the study's work and the hours it projects (what `run_study.py --dry_run
--rates` prints too).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from evaluation import features_per_second, synchronize  # benchmarks/evaluation.py

from diffusers_flat.evaluation.evaluate import resolve_device
from diffusers_flat.methods.sam import SAM
from diffusers_flat.methods.sam_modes import SAMMode
from diffusers_flat.metrics.fid import InceptionFeatures, default_fid_batch_size
from diffusers_flat.sampling import sample_images
from diffusers_flat.studies.config import Study
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.plan import StudyPlan
from diffusers_flat.training.arguments import parse_training_flags
from diffusers_flat.training.models import build_unet
from diffusers_flat.training.step import MicroBatch, train_step

SAM_RHO = 0.05  # any rho > 0 costs the same two passes


def steps_per_second(accelerator: Accelerator, unet, scheduler, flags, channels: int, sam: bool, steps: int) -> float:
    """Optimizer steps per second of a copy of `unet` on random batches of the study's shape."""
    model = copy.deepcopy(unet)
    optimizer = torch.optim.AdamW(model.parameters(), lr=flags.learning_rate)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimizer_sam = SAMMode(SAM(accelerator.unwrap_model(model).named_parameters(), rho=SAM_RHO)) if sam else None
    device, size = accelerator.device, flags.resolution
    shape = (flags.train_batch_size, channels, size, size)
    batch = MicroBatch(
        clean=torch.rand(shape, device=device) * 2 - 1,
        noise=torch.randn(shape, device=device),
        timesteps=torch.randint(0, flags.ddpm_num_steps, (flags.train_batch_size,), device=device),
    )
    micro_batches = [batch] * flags.gradient_accumulation_steps
    for i in range(2 + steps):  # two warm-up steps
        if i == 2:
            synchronize(device)
            start = time.perf_counter()
        train_step(
            accelerator,
            model,
            optimizer,
            scheduler,
            micro_batches,
            sam=optimizer_sam,
            max_grad_norm=flags.max_grad_norm,
        )
    synchronize(device)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="A study file, e.g. studies/paper-cifar10.yaml.")
    parser.add_argument("--output", required=True, help="Where the rates go (JSON), for run_study.py --rates.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--channels", type=int, default=3, help="The data's channels (the embedded digits: 1).")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps, plain and SAM.")
    args = parser.parse_args()
    study = Study.load(args.study)
    plan = StudyPlan(study, StudyDirectory("unused"))  # checks every flag of the study
    grid = study.runs(study.tuning.values[0] if study.tuning else None)
    flags = parse_training_flags(grid[0].flags)
    settings, options = plan.evaluation.settings, plan.evaluation.options
    device = resolve_device(args.device)
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")

    torch.manual_seed(0)
    unet = build_unet(flags.model_config_name_or_path, flags.resolution, args.channels, learn_sigma=flags.learn_sigma)
    variance = "learned_range" if flags.learn_sigma else "fixed_small"
    scheduler = DDPMScheduler(
        num_train_timesteps=flags.ddpm_num_steps, beta_schedule=flags.ddpm_beta_schedule, variance_type=variance
    )
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=flags.mixed_precision)
    print(
        f"device: {where}; study {study.path}: batch {flags.train_batch_size}, {flags.resolution}x{flags.resolution}"
    )
    plain = steps_per_second(accelerator, unet, scheduler, flags, args.channels, sam=False, steps=args.steps)
    sam = steps_per_second(accelerator, unet, scheduler, flags, args.channels, sam=True, steps=args.steps)
    print(f"training: {plain:.3g} steps/s, SAM {sam:.3g} steps/s ({plain / sam:.2f}x the time)")

    unet = unet.to(device).eval()
    sample_images(unet, scheduler, 2, 2, batch_size=2, show_progress=False)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    sample_images(unet, scheduler, settings.batch_size, 20, batch_size=settings.batch_size, show_progress=False)
    synchronize(device)
    forwards = settings.batch_size * 20 / (time.perf_counter() - start)
    print(f"sampling: {forwards:.4g} UNet image-forwards/s (batch {settings.batch_size})")

    fid_batch = options["fid_batch_size"] or default_fid_batch_size(device)
    size = (2 * fid_batch, flags.resolution, flags.resolution, args.channels)
    images = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    inception = InceptionFeatures(dtype=options["fid_dtype"]).to(device)
    features, _ = features_per_second(inception, images, fid_batch, device)
    print(f"InceptionV3 ({options['fid_dtype']}): {features:.3g} images/s (batch {fid_batch})")

    rates = {
        "study": str(study.path),
        "device": where,
        "plain_steps_per_s": plain,
        "sam_steps_per_s": sam,
        "unet_image_forwards_per_s": forwards,
        "inception_images_per_s": features,
    }
    Path(args.output).write_text(json.dumps(rates, indent=2) + "\n")
    work = plan.workload(plan.tasks(1, 1))  # the whole study, as its --dry_run costs it
    print(work.describe())
    print(work.projection(rates))
    print(f"rates written to {args.output}")


if __name__ == "__main__":
    main()
