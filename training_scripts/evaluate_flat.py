"""Evaluate trained DDPM pipelines: FID at few and many steps, LPF, loss under perturbation, the loss surface,
exposure bias, memorization and FID under weight quantization, per model and side by side.

    python training_scripts/evaluate_flat.py --model_path ddpm-flat-digits [more dirs] --output_dir eval [--quantize 8]
    accelerate launch --num_processes 8 training_scripts/evaluate_flat.py --model_path ...  # 8 GPUs share the sampling

The measurements are `diffusers_flat.evaluation.evaluate`; this script reads the run directories, writes the reports
and plots, and publishes each model's evaluation into its run directory (`evaluation/`) and refreshes its model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.evaluate import evaluate, resolve_device, set_fid_reference
from diffusers_flat.evaluation.plots import (
    plot_exposure_bias,
    plot_fid_vs_bits,
    plot_loss_surfaces,
    plot_nearest_neighbours,
    plot_perturbation_curves,
)
from diffusers_flat.evaluation.real_images import RealImages, load_real_images
from diffusers_flat.evaluation.registry import METRICS, Evaluation, EvaluationResult
from diffusers_flat.evaluation.settings import DEFAULT_METRICS, EvaluationSettings
from diffusers_flat.evaluation.tables import quantization_table, results_table
from diffusers_flat.hub.model_card import write_model_card
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser
from diffusers_flat.metrics.fid import FID, FID_DTYPES, InceptionFeatures
from diffusers_flat.metrics.pfd import check_steps
from diffusers_flat.run_directory import VARIANTS, RunDirectory, write_atomically, write_json
from diffusers_flat.training.step import leave_without_teardown
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, run_main, share_cpu_threads
from diffusers_flat.utils.sampling import image_grid

logger = logging.getLogger("evaluate_flat")
DEFAULTS = EvaluationSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", nargs="+", required=True, help="Output dirs of train_flat_ddpm.py.")
    parser.add_argument("--variant", default="raw", help=f"Which weights of each model: {', '.join(VARIANTS)}.")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        help=f"Any of: {', '.join(METRICS)} (default: all but pfd, which needs --pfd_reference).",
    )
    parser.add_argument(
        "--inference_steps", nargs="+", type=int, default=list(DEFAULTS.inference_steps), help="FID columns T'."
    )
    parser.add_argument("--num_samples", type=int, default=DEFAULTS.num_samples, help="Generated images per column.")
    parser.add_argument("--num_real", type=int, default=DEFAULTS.num_real, help="At most this many real images.")
    parser.add_argument(
        "--quantize",
        nargs="+",
        type=int,
        default=[],
        help="Also FID with weights quantized to these bits (2-8; the paper: 8), as in Table 4.",
    )
    parser.add_argument(
        "--quantize_granularity", default=DEFAULTS.quantize_granularity, help="per_tensor or per_channel scales."
    )
    parser.add_argument(
        "--quantize_inference_steps",
        nargs="+",
        type=int,
        default=[],
        help="Sample the quantized weights at these of --inference_steps only (default: all of them).",
    )
    parser.add_argument("--output_dir", default="eval")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N: the UNet and InceptionV3."
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--batch_size", type=int, default=DEFAULTS.batch_size, help="Images per UNet batch.")
    parser.add_argument(
        "--fid_batch_size",
        type=int,
        default=None,
        help="Images per InceptionV3 batch (default: 200 on a GPU, about 6 GB; 32 on the CPU, its fastest).",
    )
    parser.add_argument(
        "--fid_dtype",
        default="float32",
        choices=list(FID_DTYPES),
        help="InceptionV3's precision: float32 (the reference) or bfloat16 (faster on GPUs; FID deviates slightly).",
    )
    parser.add_argument(
        "--loss_samples", type=int, default=DEFAULTS.loss_samples, help="(x0, t, eps) triples of the fixed loss."
    )
    parser.add_argument("--lpf_sigma", type=float, default=DEFAULTS.lpf_sigma)
    parser.add_argument("--lpf_draws", type=int, default=DEFAULTS.lpf_draws, help="K, the Monte Carlo draws of LPF.")
    parser.add_argument("--gammas", nargs="+", type=float, default=list(DEFAULTS.gammas))
    parser.add_argument(
        "--directions", type=int, default=DEFAULTS.directions, help="Random directions of the perturbation curve."
    )
    parser.add_argument("--surface_extent", type=float, default=DEFAULTS.surface_extent)
    parser.add_argument("--surface_resolution", type=int, default=DEFAULTS.surface_resolution)
    parser.add_argument("--exposure_samples", type=int, default=DEFAULTS.exposure_samples)
    parser.add_argument(
        "--pfd_reference",
        default=None,
        help="The pfd metric's reference: a pipeline directory (E_gen against a teacher) or 'empirical' (E_mem: the "
        "empirical denoiser of the model's training set).",
    )
    parser.add_argument("--pfd_reference_variant", default="raw", help="Which weights of a --pfd_reference directory.")
    parser.add_argument("--pfd_noises", type=int, default=DEFAULTS.pfd_noises, help="Shared starting noises of PFD.")
    parser.add_argument("--pfd_steps", type=int, default=DEFAULTS.pfd_steps, help="PF-ODE solver steps.")
    parser.add_argument("--pfd_solver", default=DEFAULTS.pfd_solver, help="ddim (eta = 0) or dpm-solver++.")
    parser.add_argument("--pfd_descriptor", default=DEFAULTS.pfd_descriptor, help="pixels or inception.")
    parser.add_argument("--cache_dir", default=None, help="Where real-image FID statistics are cached.")
    # Overrides of the dataset recorded in training_args.json
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--image_column", default=None)
    args = parser.parse_args(argv)
    args.metrics = list(dict.fromkeys(args.metrics))
    return args


def settings_from(args: argparse.Namespace) -> EvaluationSettings:
    """The evaluation settings the flags ask for (checked, with errors naming the settings, i.e. the flags)."""
    names = [field.name for field in dataclasses.fields(EvaluationSettings)]
    values = {name: tuple(v) if isinstance(v := getattr(args, name), list) else v for name in names}
    return EvaluationSettings(**values)


def markdown_report(results: dict[str, EvaluationResult], steps: list[int]) -> str:
    table4 = quantization_table(results)
    return results_table(results, steps) + (f"\n{table4}" if table4 else "")


def write_model_report(
    name: str, evaluation: Evaluation, settings: EvaluationSettings, real: RealImages, out: Path
) -> None:
    """One model's results, table, sample grids and plots in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    result = evaluation.result
    for steps, images in evaluation.samples.items():
        image_grid(images[:64]).save(out / f"samples_{steps}_steps.png")
    for (bits, steps), images in evaluation.quantized_samples.items():
        image_grid(images[:64]).save(out / f"samples_{steps}_steps_{bits}bit.png")
    if "quantization" in result:
        plot_fid_vs_bits({name: result}, out / "fid_vs_bits.png")
    if "perturbation" in result:
        plot_perturbation_curves({name: result["perturbation"]}, out / "perturbation.png")
    if "memorization" in result:
        generated = evaluation.samples[max(evaluation.samples)]
        plot_nearest_neighbours(generated, real.training_images().uint8, evaluation.nearest, out / "memorization.png")
    write_json(out / "eval_results.json", result)
    report = markdown_report({name: result}, list(settings.inference_steps))
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(report))


def load_reference(args: argparse.Namespace, runs: dict[str, RunDirectory], device) -> DDPMPipeline | None:
    """The pfd metric's reference pipeline (None for 'empirical', built per model), and every model to evaluate
    checked against it (image shape, noise schedule) and against the solver's steps, before anything is written."""
    if "pfd" not in args.metrics:
        return None
    reference = None
    if args.pfd_reference != "empirical":
        try:
            path = RunDirectory(args.pfd_reference).require_pipeline(args.pfd_reference_variant, "pfd_reference")
        except FlatError as err:
            raise UsageError(
                f"--pfd_reference {args.pfd_reference}: neither 'empirical' nor a pipeline directory with "
                f"{args.pfd_reference_variant} weights ({err})"
            ) from None
        reference = DDPMPipeline.from_pretrained(path).to(device)
    for name, run in runs.items():
        model = run.pipeline_path(args.variant)
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        check_steps(args.pfd_steps, args.pfd_solver, scheduler.config.num_train_timesteps)
        if reference is None:
            continue
        config = UNet2DModel.load_config(model, subfolder="unet")
        shape, reference_shape = (
            f"{c['in_channels']}x{c['sample_size']}x{c['sample_size']}" for c in (config, reference.unet.config)
        )
        if shape != reference_shape:
            raise UsageError(
                f"--pfd_reference {args.pfd_reference}: its images are {reference_shape}, {name}'s {shape}: PFD "
                "compares models of one shape"
            )
        if not torch.equal(scheduler.alphas_cumprod, reference.scheduler.alphas_cumprod):
            raise UsageError(f"--pfd_reference {args.pfd_reference}: trained under another noise schedule than {name}")
    return reference


def main(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    device = resolve_device(args.device)
    # Under `accelerate launch --num_processes N`: N processes split the sampling and the features (gloo on the CPU).
    processes = PartialState(cpu=device.type == "cpu")
    if processes.num_processes > 1:
        if device.type == "cuda" and device.index is not None:
            raise UsageError(f"--device {args.device}: several processes take a GPU each; use auto or cuda")
        device = processes.device
    if device.type == "cpu":
        share_cpu_threads(processes.num_processes)
    main_process = processes.is_main_process
    runs = {}
    for path in args.model_path:
        run = RunDirectory(path)
        run.require_pipeline(args.variant, parameter="model_path")
        name = run.name + ("" if args.variant == "raw" else f"-{args.variant}")
        runs[name if name not in runs else f"{name}-{len(runs)}"] = run
    reference = load_reference(args, runs, device)
    out = Path(args.output_dir)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    fid = None
    if "fid" in settings.metrics:
        features = InceptionFeatures(dtype=args.fid_dtype)
        fid = FID(features, batch_size=args.fid_batch_size, device=device, show_progress=main_process)
    overrides = {
        k: getattr(args, k) for k in ("dataset_name", "dataset_config_name", "train_data_dir", "image_column")
    }

    real_images: dict[tuple, RealImages] = {}  # models trained on the same data share one read of it
    results: dict[str, EvaluationResult] = {}
    for name, run in runs.items():
        pipeline = DDPMPipeline.from_pretrained(run.pipeline_path(args.variant)).to(device)
        source = run.read_record().data.replace(**overrides)
        shape = (source, pipeline.unet.config.sample_size, pipeline.unet.config.in_channels)
        if shape not in real_images:
            real_images[shape] = load_real_images(*shape)
        real = real_images[shape]
        if fid is not None and main_process:
            set_fid_reference(fid, real, settings, args.cache_dir or out / "fid_cache")
        against = reference.unet if reference else None
        if "pfd" in settings.metrics and args.pfd_reference == "empirical" and run.read_record().noise_unconditional:
            # a model trained blind to the noise level is compared with the empirical denoiser blind to it too
            training = real.training_images().tensors
            against = EmpiricalDenoiser.from_training_set(training, pipeline.scheduler, noise_unconditional=True)
            against = against.to(device)
        evaluation = evaluate(pipeline.unet, pipeline.scheduler, real, settings, fid, processes, against)
        if not main_process:
            continue
        evaluation.result.update(model=name, path=str(run.pipeline_path(args.variant)), variant=args.variant)
        results[name] = evaluation.result
        write_model_report(name, evaluation, settings, real, out / name)
        # The run directory keeps its latest evaluation beside the weights, for its model card, the Hub and the Space.
        run.publish_evaluation(args.variant, out / name)
        write_model_card(run.path)
    if not main_process:
        return

    write_json(out / "eval_results.json", results)
    report = markdown_report(results, list(settings.inference_steps))
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(report))
    if "perturbation" in settings.metrics:
        plot_perturbation_curves({n: r["perturbation"] for n, r in results.items()}, out / "perturbation.png")
    if "surface" in settings.metrics:
        plot_loss_surfaces({n: r["surface"] for n, r in results.items()}, out / "loss_surface.png")
    if "exposure_bias" in settings.metrics:
        plot_exposure_bias({n: r["exposure_bias"] for n, r in results.items()}, out / "exposure_bias.png")
    if settings.quantize:
        plot_fid_vs_bits(results, out / "fid_vs_bits.png")
    print(report)


def cli(argv: list[str] | None = None) -> None:
    """The command line: parse `argv`, evaluate, and report bad input as one line naming the flag (exit status 1)."""
    flags = {"bits": "--quantize", "granularity": "--quantize_granularity", "q": "--pfd_reference"}
    flags |= {"steps": "--pfd_steps"}
    run_main(main, parse_args(argv), flags=flags)
    processes = PartialState()
    processes.wait_for_everyone()
    leave_without_teardown(processes)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    cli()
