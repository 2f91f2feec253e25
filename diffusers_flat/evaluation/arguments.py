"""The evaluation's flags, one parser for evaluate_flat.py and for a study file's `evaluation:` lists, so that a
study's flags are checked the way the script checks them, before anything runs."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from diffusers_flat.evaluation.settings import DEFAULT_METRICS, METRIC_NAMES, EvaluationSettings
from diffusers_flat.metrics.fid import FID_DTYPES
from diffusers_flat.utils.cli import OneLineArgumentParser, parse_flags

DEFAULTS = EvaluationSettings()
# The flags that are not settings: how `evaluate_runs` loads the models and the data (its keyword arguments).
DATA_OVERRIDES = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "dataset_split")
RUN_OPTIONS = ("device", "fid_batch_size", "fid_dtype", "pfd_reference_variant")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of what to measure and how (not which models, nor where the results go) to `parser`."""
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        help=f"Any of: {', '.join(METRIC_NAMES)} (default: all but pfd, which needs --pfd_reference, and sensitivity)",
    )
    parser.add_argument(
        "--inference_steps", nargs="+", type=int, default=list(DEFAULTS.inference_steps), help="FID columns T'."
    )
    parser.add_argument("--num_samples", type=int, default=DEFAULTS.num_samples, help="Generated images per column.")
    parser.add_argument("--num_real", type=int, default=DEFAULTS.num_real, help="At most this many real images.")
    parser.add_argument(
        "--sampler",
        default=DEFAULTS.sampler,
        help="The pipeline sampler of the FID columns, fp32 and quantized: ddpm (DDPMPipeline, the paper's respaced "
        "ancestral sampling) or ddim (DDIMPipeline, eta 0); the model's own scheduler config either way.",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=[],
        help="Also FID and KID with quantized weights, from the same noises as fp32, at these levels: B:granularity "
        "(e.g. 5:per_channel 4:per_channel) or a bare B (2-8) at --quantize_granularity; the paper's Table 4: 8.",
    )
    parser.add_argument(
        "--quantize_granularity",
        default=DEFAULTS.quantize_granularity,
        help="per_tensor or per_channel scales of a bare --quantize B.",
    )
    parser.add_argument(
        "--quantize_inference_steps",
        nargs="+",
        type=int,
        default=[],
        help="Sample the quantized weights at these of --inference_steps only (default: all of them).",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        help="With --quantize, class fidelity too: fashion-mnist (the shipped 16x16 classifier) or a "
        "ResNetForImageClassification directory labels the fp32 and quantized samples.",
    )
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
        "--features",
        default=DEFAULTS.features,
        help="The feature space of FID, KID and precision/recall: inception (the TF-ported InceptionV3) or dinov2.",
    )
    parser.add_argument(
        "--dinov2_model",
        default=DEFAULTS.dinov2_model,
        help="With --features dinov2: the DINOv2 model's Hub id or local directory (default ViT-L/14).",
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
        help="The pfd metric's reference: a pipeline directory (E_gen against a teacher), 'empirical' (E_mem: the "
        "empirical denoiser of the model's training set) or 'smoothed' (the paper's smoothed empirical score of it).",
    )
    parser.add_argument(
        "--pfd_neighbours",
        type=int,
        default=DEFAULTS.pfd_neighbours,
        help="K nearest training images of the 'smoothed' reference (the paper's 30; all of them when fewer).",
    )
    parser.add_argument("--pfd_reference_variant", default="raw", help="Which weights of a --pfd_reference directory.")
    parser.add_argument("--pfd_noises", type=int, default=DEFAULTS.pfd_noises, help="Shared starting noises of PFD.")
    parser.add_argument("--pfd_steps", type=int, default=DEFAULTS.pfd_steps, help="PF-ODE solver steps.")
    parser.add_argument("--pfd_solver", default=DEFAULTS.pfd_solver, help="ddim (eta = 0) or dpm-solver++.")
    parser.add_argument("--pfd_descriptor", default=DEFAULTS.pfd_descriptor, help="pixels or inception.")
    # Overrides of the dataset recorded in training_args.json
    parser.add_argument(
        "--ladder",
        nargs="+",
        type=int,
        default=list(DEFAULTS.ladder),
        help="The sensitivity metric's bits: loss increase and pixel displacements at each (2-8).",
    )
    parser.add_argument(
        "--ladder_granularities",
        nargs="+",
        default=list(DEFAULTS.ladder_granularities),
        help="The sensitivity metric's scales: per_tensor and/or per_channel.",
    )
    parser.add_argument("--ladder_samples", type=int, default=DEFAULTS.ladder_samples, help="Samples per level.")
    parser.add_argument(
        "--ladder_steps",
        type=int,
        default=DEFAULTS.ladder_steps,
        help="Steps of those samples (pipeline samplers and the PF-ODE); a divisor of the training timesteps.",
    )
    parser.add_argument(
        "--ladder_sampler",
        default=DEFAULTS.ladder_sampler,
        help="The pipeline sampler of the ladder's displacement: ddim (DDIMPipeline, eta 0) or ddpm.",
    )
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--dataset_split", default=None, help="The split the models trained on (default: recorded).")
    return parser


def settings_from(args: argparse.Namespace) -> EvaluationSettings:
    """The evaluation settings the flags ask for (checked, with errors naming the settings, i.e. the flags)."""
    names = [field.name for field in dataclasses.fields(EvaluationSettings)]
    values = {name: tuple(v) if isinstance(v := getattr(args, name), list) else v for name in names}
    values["metrics"] = tuple(dict.fromkeys(values["metrics"]))
    return EvaluationSettings(**values)


def run_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `evaluate_runs` the flags set: device, InceptionV3's batch and precision, the pfd
    reference's variant and the dataset overrides."""
    overrides = {name: getattr(args, name) for name in DATA_OVERRIDES if getattr(args, name) is not None}
    return {name: getattr(args, name) for name in RUN_OPTIONS} | {"data_overrides": overrides}


def parse_evaluation_flags(flags: Sequence[str]) -> tuple[EvaluationSettings, dict]:
    """A flag list (a study file's `evaluation:`) as settings and `evaluate_runs` keyword arguments. Raises a
    UsageError with the parser's complaint, or a FlatError naming the setting at fault.

    Example:
        >>> settings, options = parse_evaluation_flags(["--metrics", "lpf", "--lpf_draws", "5"])
        >>> settings.metrics, settings.lpf_draws, options["device"]
        (('lpf',), 5, 'auto')
    """
    args = parse_flags(add_evaluation_arguments(OneLineArgumentParser(add_help=False)), flags)
    return settings_from(args), run_options(args)
