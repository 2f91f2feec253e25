"""The evaluation's flags, one parser for evaluate_flat.py and for a study file's `evaluation:` lists, so that a
study's flags are checked the way the script checks them, before anything runs."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from diffusers_flat.evaluation.settings import METRIC_NAMES, EvaluationSettings
from diffusers_flat.metrics.fid import FID_DTYPES
from diffusers_flat.utils.cli import OneLineArgumentParser, add_dataclass_flags, parse_flags

# The flags that are not settings: how `evaluate_runs` loads the models and the data (its keyword arguments).
DATA_OVERRIDES = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "dataset_split")
RUN_OPTIONS = ("device", "fid_batch_size", "fid_dtype", "pfd_reference_variant")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of what to measure and how (not which models, nor where the results go) to `parser`: one for
    each field of `EvaluationSettings`, then the run options and the dataset overrides."""
    add_dataclass_flags(
        parser,
        EvaluationSettings,
        {"metrics": f"Any of: {', '.join(METRIC_NAMES)} (default: all but pfd and sensitivity)."},
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N: the UNet and InceptionV3."
    )
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
    parser.add_argument("--pfd_reference_variant", default="raw", help="Which weights of a --pfd_reference directory.")
    # Overrides of the dataset recorded in training_args.json
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
