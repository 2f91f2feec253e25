"""The training script's flags, made from `TrainingConfig`'s fields: one parser for train_flat_ddpm.py and for a
study file's `training:` lists, so that a study's trainings are checked the way the script checks them, before any
starts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub

from diffusers_flat.methods.sam import check_rho
from diffusers_flat.methods.sam_modes import LOOKSAM_ALPHA
from diffusers_flat.training.config import TrainingConfig
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, add_dataclass_flags, parse_flags


def training_parser(description: str | None = None) -> OneLineArgumentParser:
    """The parser of every training flag, one for each field of `TrainingConfig`; `@file` reads flags from a file
    (recipes/)."""
    parser = OneLineArgumentParser(description=description, fromfile_prefix_chars="@")
    add_dataclass_flags(parser, TrainingConfig)
    return parser


def parse_training_flags(flags: Sequence[str]) -> TrainingConfig:
    """A flag list (a study file's `training:` and method flags) parsed as the script parses its command line, as the
    configuration it asks for; the parser's complaint is raised as a UsageError.

    Example:
        >>> parse_training_flags(["--sam_rho", "0.01"]).sam_rho
        0.01
    """
    return TrainingConfig(**vars(parse_flags(training_parser(), flags)))


SAM_MODE_FLAGS = {"sam_every": ("every", "looksam"), "looksam_alpha": ("looksam",), "sam_start": ("late",)}
SAM_MODE_DEFAULTS = {"sam_every": 5, "looksam_alpha": LOOKSAM_ALPHA, "sam_start": 0.75}


def check_sam_mode(args: argparse.Namespace) -> None:
    """Reject --sam_mode combinations that cannot work, then fill in the defaults of the flags the mode reads."""
    if args.sam_mode != "full" and not args.sam_rho > 0:
        raise UsageError(f"--sam_mode {args.sam_mode} needs --sam_rho > 0 (its radius, or random mode's sigma)")
    for flag, modes in SAM_MODE_FLAGS.items():
        if getattr(args, flag) is not None and args.sam_mode not in modes:
            raise UsageError(f"--{flag} is read only by --sam_mode {' or '.join(modes)}, not {args.sam_mode}")
        if getattr(args, flag) is None and args.sam_mode in modes:
            setattr(args, flag, SAM_MODE_DEFAULTS[flag])
    if args.sam_every is not None and args.sam_every < 1:
        raise UsageError(f"--sam_every must be >= 1, got {args.sam_every}")
    if args.looksam_alpha is not None and not args.looksam_alpha >= 0:
        raise UsageError(f"--looksam_alpha must be >= 0 (LookSAM: 0.7), got {args.looksam_alpha}")
    if args.sam_start is not None and not 0 <= args.sam_start < 1:
        raise UsageError(f"--sam_start must be a fraction of training in [0, 1), got {args.sam_start}")
    if args.sam_mode == "momentum" and not args.adam_beta1 > 0:
        raise UsageError(
            f"--sam_mode momentum reads Adam's first moment: --adam_beta1 must be > 0, got {args.adam_beta1}"
        )
    if args.asam_eta is not None and not (args.sam_adaptive and args.asam_eta >= 0):
        raise UsageError(f"--asam_eta must be >= 0 and comes with --sam_adaptive (ASAM), got {args.asam_eta}")
    if args.sam_adaptive and args.sam_mode in ("momentum", "random"):
        raise UsageError(f"--sam_adaptive scales SAM's ascent, which --sam_mode {args.sam_mode} does not take")
    if args.sam_ascent == "local" and args.sam_mode not in ("full", "every", "late"):
        raise UsageError(
            f"--sam_ascent local needs --sam_mode full, every or late: {args.sam_mode} must perturb every rank alike"
        )


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
    if args.flatness_every < 0:
        raise UsageError(f"--flatness_every must be >= 0 (0: off), got {args.flatness_every}")
    if args.flatness_every and (args.flatness_draws < 2 or args.flatness_samples < 1):
        raise UsageError(
            f"--flatness_draws must be >= 2 and --flatness_samples >= 1, got {args.flatness_draws} and "
            f"{args.flatness_samples}"
        )
    if not args.input_perturbation >= 0:
        raise UsageError(f"--input_perturbation must be >= 0 (paper: 0.1), got {args.input_perturbation}")
    if args.swa_cycle < 1:
        raise UsageError(f"--swa_cycle must be >= 1 (paper: 100), got {args.swa_cycle}")
    if args.model_card_template and not Path(args.model_card_template).is_file():
        raise UsageError(f"--model_card_template: no file {args.model_card_template}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning_rate must be > 0, got {args.learning_rate}")
    check_sam_mode(args)
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
