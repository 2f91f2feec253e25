"""The training script's flags: one parser for train_flat_ddpm.py and for a study file's `training:` lists, so that
a study's trainings are checked the way the script checks them, before any starts. Flags that exist in diffusers'
`train_unconditional.py` keep their names and meanings."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub

from diffusers_flat.methods.sam import ASAM_ETA, check_rho
from diffusers_flat.methods.sam_modes import LOOKSAM_ALPHA, SAM_MODES
from diffusers_flat.methods.timestep_sampler import TIMESTEP_SAMPLERS
from diffusers_flat.training.models import PRESETS
from diffusers_flat.training.step import SAM_ASCENT_MODES
from diffusers_flat.utils.cli import OneLineArgumentParser, UsageError, parse_flags


def training_parser(description: str | None = None) -> OneLineArgumentParser:
    """The parser of every training flag; `@file` reads flags from a file (recipes/)."""
    parser = OneLineArgumentParser(description=description, fromfile_prefix_chars="@")
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
        "--dataset_split",
        type=str,
        default="train",
        help="The split to train on (fashion_mnist: train or test; its FID compares with the test split).",
    )
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
    parser.add_argument(
        "--sam_adaptive", action="store_true", help="Adaptive SAM (ASAM): scale e by |w| + eta on the weights."
    )
    parser.add_argument(
        "--asam_eta", type=float, default=None, help=f"ASAM's offset eta of |w| (default {ASAM_ETA}, ASAM's)."
    )
    parser.add_argument(
        "--sam_ascent",
        type=str,
        default="global",
        choices=SAM_ASCENT_MODES,
        help="Across processes, perturb along the all-reduced gradient (global) or each process's own (local, "
        "m-sharpness, no extra all-reduce).",
    )
    parser.add_argument(
        "--sam_mode",
        type=str,
        default="full",
        choices=SAM_MODES,
        help="full: SAM every step (2 passes). Cheaper: every (SAM every --sam_every steps, plain between), looksam "
        "(SAM every --sam_every steps, its orthogonal component reused between), momentum (one pass at w - rho "
        "m/||m||, m Adam's first moment), late (plain until --sam_start, then full), random (one pass at Gaussian "
        "weight noise scaled as LPF's, --sam_rho its sigma).",
    )
    parser.add_argument(
        "--sam_every", type=int, default=None, help="K of --sam_mode every and looksam (default 5, LookSAM's k)."
    )
    parser.add_argument(
        "--looksam_alpha", type=float, default=None, help=f"LookSAM's alpha (default {LOOKSAM_ALPHA})."
    )
    parser.add_argument(
        "--sam_start",
        type=float,
        default=None,
        help="--sam_mode late: the fraction of training, in [0, 1), after which SAM starts (default 0.75).",
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
    # Flatness during training
    parser.add_argument(
        "--flatness_every",
        type=int,
        default=0,
        help="Every N steps, log a cheap LPF estimate (flatness/lpf, flatness.json); 0 turns it off.",
    )
    parser.add_argument("--flatness_draws", type=int, default=8, help="LPF draws of each estimate.")
    parser.add_argument(
        "--flatness_samples", type=int, default=64, help="The first N training images: the estimate's fixed triples."
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
    return parser


def parse_training_flags(flags: Sequence[str]) -> argparse.Namespace:
    """A flag list (a study file's `training:` and method flags) parsed as the script parses its command line; the
    parser's complaint is raised as a UsageError.

    Example:
        >>> parse_training_flags(["--sam_rho", "0.01"]).sam_rho
        0.01
    """
    return parse_flags(training_parser(), flags)


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
