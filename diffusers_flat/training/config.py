"""The training configuration, written once: `TrainingConfig` holds every flag of train_flat_ddpm.py (the parser is
made from its fields, `training/arguments.py`), is what a run's `training_args.json` stores, and is what
`TrainingRecord` reads back. Flags that exist in diffusers' `train_unconditional.py` keep their names and meanings."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from diffusers_flat.methods.sam import SAM_ASCENT_MODES
from diffusers_flat.methods.sam_modes import SAM_MODES
from diffusers_flat.methods.timestep_sampler import TIMESTEP_SAMPLERS
from diffusers_flat.run_directory import DataSource, RunDirectory

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb")
SECRETS = ("hub_token",)  # never recorded: a secret is never on disk, never pushed


def _choices(names: tuple[str, ...]) -> dict:
    return {"choices": names}


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a training run, as train_flat_ddpm.py's flags (`--name`) set them.

    Args:
        dataset_name: A dataset on the Hub, or a local dataset directory. With neither this nor train_data_dir: the
            embedded scikit-learn digits.
        dataset_config_name: The dataset's config, if it has several.
        train_data_dir: A folder of images (imagefolder layout). Ignored if dataset_name is given.
        image_column: The dataset column holding the images.
        dataset_split: The split to train on (fashion_mnist: train or test; its FID compares with the test split).
        train_subset: Train on this many images of the dataset, a fixed random subset (nested: the 32 are among the
            128).
        train_subset_seed: Which random subset train_subset takes.
        cache_dir: Where downloaded datasets are stored.
        resolution: Images are resized and cropped to this size.
        center_crop: Crop at the centre instead of at random.
        random_flip: Flip images horizontally at random.
        dataloader_num_workers: Subprocesses for loading data.
        model_config_name_or_path: A UNet2DModel config file or directory, or a preset: tiny, ddpm-cifar10,
            adm-cifar10, adm-64.
        noise_unconditional: Train a UNet blind to the noise level (its time embedding a learned constant), the
            learned counterpart of the empirical denoiser's noise-unconditional variant.
        ddpm_num_steps: Diffusion steps T of training.
        ddpm_num_inference_steps: Respaced DDPM steps for the sample grids.
        ddpm_beta_schedule: The noise schedule's betas.
        prediction_type: What the UNet predicts.
        learn_sigma: Learn the variance (twice the channels out) with the hybrid loss L_simple + L_vlb (Nichol &
            Dhariwal; the paper's ADM); plain diffusers samples it through the scheduler's variance_type
            learned_range.
        timestep_sampler: How training draws t: uniform, or loss-second-moment importance sampling (ADM, with
            learn_sigma).
        timestep_spacing: Which timesteps respaced sampling keeps, saved in the pipeline's scheduler. linspace: 999,
            ..., 0 as guided-diffusion's respacing (the paper's sampler); leading is diffusers' default.
        train_batch_size: Batch size per process.
        eval_batch_size: Images in each sample grid.
        num_epochs: Ignored if max_train_steps is set.
        max_train_steps: Optimizer steps; overrides num_epochs.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        learning_rate: AdamW's learning rate after warm-up.
        lr_scheduler: The learning-rate schedule (diffusers' `get_scheduler`).
        lr_warmup_steps: Linear warm-up steps of the learning rate.
        adam_beta1: AdamW's beta1 (its first moment: what momentum mode reads).
        adam_beta2: AdamW's beta2.
        adam_weight_decay: AdamW's decoupled weight decay.
        adam_epsilon: AdamW's epsilon.
        max_grad_norm: Gradient clipping bound; 0 turns it off.
        seed: Seeds the model, the data order and the noise.
        mixed_precision: no, fp16 or bf16 (bf16 works with SAM).
        enable_xformers_memory_efficient_attention: xFormers' attention in the UNet.
        num_cpu_threads: Torch threads per process when training on CPU (default: the cores divided among the
            processes; `accelerate launch` would otherwise leave one).
        sam_rho: SAM neighbourhood radius rho; 0 turns SAM off.
        sam_adaptive: Adaptive SAM (ASAM): scale e by |w| + eta on the weights.
        asam_eta: ASAM's offset eta of |w| (default 0.01, ASAM's).
        sam_ascent: Across processes, perturb along the all-reduced gradient (global) or each process's own (local,
            m-sharpness, no extra all-reduce).
        sam_mode: full: SAM every step (2 passes). Cheaper: every (SAM every sam_every steps, plain between), looksam
            (SAM every sam_every steps, its orthogonal component reused between), momentum (one pass at w - rho
            m/||m||, m Adam's first moment), late (plain until sam_start, then full), random (one pass at Gaussian
            weight noise scaled as LPF's, sam_rho its sigma).
        sam_every: K of sam_mode every and looksam (default 5, LookSAM's k).
        looksam_alpha: LookSAM's alpha (default 0.7).
        sam_start: sam_mode late: the fraction of training, in [0, 1), after which SAM starts (default 0.75).
        use_ema: Keep an EMA of the weights, saved in output_dir/ema.
        ema_inv_gamma: The inverse gamma of the EMA warm-up.
        ema_power: The power of the EMA warm-up.
        ema_max_decay: The maximum EMA decay.
        ema_constant_decay: EMA at ema_max_decay from the start, without warm-up (guided-diffusion's ema_rate, the
            paper's).
        use_swa: Keep an SWA average, saved in output_dir/swa.
        swa_start: First SWA step: a step number, or a fraction of training if below 1 (paper: 180K of 200K).
        swa_cycle: Average every this many steps (paper: 100).
        input_perturbation: DDPM-IP gamma: train on eps + gamma*xi (paper: 0.1).
        flatness_every: Every N steps, log a cheap LPF estimate (flatness/lpf, flatness.json); 0 turns it off.
        flatness_draws: LPF draws of each estimate.
        flatness_samples: The first N training images: the estimate's fixed triples.
        output_dir: The run directory.
        overwrite_output_dir: Start afresh in an output dir that holds a run.
        save_images_epochs: Sample grid every this many epochs.
        save_model_epochs: Save the pipeline every this many epochs.
        checkpointing_steps: Save a resumable checkpoint every this many steps.
        checkpoints_total_limit: Keep at most this many.
        resume_from_checkpoint: A checkpoint name or path, or "latest".
        logger: tensorboard or wandb.
        logging_dir: Relative to output_dir.
        local_rank: Set by the launcher.
        push_to_hub: Push the pipeline(s) and card at the end.
        hub_model_id: Repo to push to; default: output dir name.
        hub_private_repo: Create the repo private.
        hub_token: Write token; default: stored login or HF_TOKEN.
        model_card_template: A Jinja model card template of your own (see model_cards/); default: the one
            diffusers_flat ships.

    Example:
        >>> config = TrainingConfig(sam_rho=0.01, use_ema=True)
        >>> config.sam_rho, config.uses_sam, config.ema_max_decay
        (0.01, True, 0.9999)
    """

    # Data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    dataset_split: str = "train"
    train_subset: int | None = None
    train_subset_seed: int = 0
    cache_dir: str | None = None
    resolution: int = 16
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: int = 0
    # Model and diffusion
    model_config_name_or_path: str = "tiny"
    noise_unconditional: bool = False
    ddpm_num_steps: int = 1000
    ddpm_num_inference_steps: int = 100
    ddpm_beta_schedule: str = field(default="linear", metadata=_choices(BETA_SCHEDULES))
    prediction_type: str = field(default="epsilon", metadata=_choices(PREDICTION_TYPES))
    learn_sigma: bool = False
    timestep_sampler: str = field(default="uniform", metadata=_choices(TIMESTEP_SAMPLERS))
    timestep_spacing: str = field(default="linspace", metadata=_choices(TIMESTEP_SPACINGS))
    # Optimisation
    train_batch_size: int = 32
    eval_batch_size: int = 64
    num_epochs: int = 15
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    lr_scheduler: str = field(default="cosine", metadata=_choices(LR_SCHEDULERS))
    lr_warmup_steps: int = 50
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-08
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = field(default="no", metadata=_choices(MIXED_PRECISIONS))
    enable_xformers_memory_efficient_attention: bool = False
    num_cpu_threads: int | None = None
    # Flat-minima methods
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    asam_eta: float | None = None
    sam_ascent: str = field(default="global", metadata=_choices(SAM_ASCENT_MODES))
    sam_mode: str = field(default="full", metadata=_choices(SAM_MODES))
    sam_every: int | None = None
    looksam_alpha: float | None = None
    sam_start: float | None = None
    use_ema: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4
    ema_max_decay: float = 0.9999
    ema_constant_decay: bool = False
    use_swa: bool = False
    swa_start: float = 0.9
    swa_cycle: int = 100
    input_perturbation: float = 0.0
    # Flatness during training
    flatness_every: int = 0
    flatness_draws: int = 8
    flatness_samples: int = 64
    # Output, logging, checkpoints
    output_dir: str = "ddpm-flat-digits"
    overwrite_output_dir: bool = False
    save_images_epochs: int = 10
    save_model_epochs: int = 10
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    logger: str = field(default="tensorboard", metadata=_choices(LOGGERS))
    logging_dir: str = "logs"
    local_rank: int = -1
    # The Hub
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    hub_token: str | None = None
    model_card_template: str | None = None

    @property
    def uses_sam(self) -> bool:
        """Whether the run perturbs its weights SAM's way (any `sam_mode`)."""
        return self.sam_rho > 0

    @property
    def data(self) -> DataSource:
        """Where the training images come from."""
        return DataSource(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataSource)})


CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingConfig))


@dataclass(frozen=True)
class TrainingRecord:
    """A run's `training_args.json` read back: the configuration it trained with, and what the run resolved.

    Args:
        config: the run's flags, typed (a flag newer than the record, or a pipeline trained elsewhere: its default).
        resolved: the rest of the record: the steps, SWA start, batch and dataset size the run resolved, the
            processes, the precision, the model's size and the versions.

    Example:
        >>> record = TrainingRecord.from_json({"sam_rho": 0.1, "use_ema": True, "swa_start_step": 90})
        >>> record.config.sam_rho, record.config.use_ema, record.resolved
        (0.1, True, {'swa_start_step': 90})
    """

    config: TrainingConfig = TrainingConfig()
    resolved: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, recorded: dict[str, Any]) -> TrainingRecord:
        flags = {k: v for k, v in recorded.items() if k in CONFIG_FIELDS}
        return cls(TrainingConfig(**flags), {k: v for k, v in recorded.items() if k not in CONFIG_FIELDS})

    def to_json(self) -> dict[str, Any]:
        flags = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in SECRETS}
        return {**flags, **self.resolved}

    @classmethod
    def of(cls, run: RunDirectory) -> TrainingRecord | None:
        """The record of a run directory, or None for a pipeline trained elsewhere. The ema/ or swa/ pipeline of a
        run, opened as a directory of its own, reads its run's record."""
        path = run.record_file()
        return None if path is None else cls.from_json(json.loads(path.read_text()))

    def configuration(self) -> list[tuple[str, Any]]:
        """(name, value) of every recorded setting that describes the training, for a model card."""
        recorded = self.to_json()
        return [(key, recorded[key]) for key in CARD_CONFIGURATION if key in recorded]


def training_config(run: RunDirectory) -> TrainingConfig:
    """The configuration a run directory trained with; the defaults for a pipeline trained elsewhere (its data: the
    embedded digits, unless the evaluation overrides it)."""
    record = TrainingRecord.of(run)
    return TrainingConfig() if record is None else record.config


# What a model card lists of a run's training, in its order.
CARD_CONFIGURATION = (
    "resolution",
    "model_config_name_or_path",
    "num_parameters",
    "max_train_steps",
    "total_batch_size",
    "num_processes",
    "mixed_precision",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "max_grad_norm",
    "ddpm_num_steps",
    "ddpm_beta_schedule",
    "prediction_type",
    "sam_rho",
    "sam_adaptive",
    "sam_ascent",
    "use_ema",
    "ema_max_decay",
    "use_swa",
    "swa_start_step",
    "swa_cycle",
    "input_perturbation",
    "noise_unconditional",
    "train_subset",
    "dataset_size",
    "seed",
)
