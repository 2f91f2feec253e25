"""diffusers-flat: train diffusers DDPMs toward flat minima and measure what flatness buys."""

from .averaging import averaged_unet, make_ema, make_swa, resolve_swa_start, swa_due
from .checkpointing import list_checkpoints, resolve_checkpoint, save_checkpoint, save_pipeline
from .data import DataError, ImageTransform, StepBatchSampler, TrainingImages, load_digits_dataset, load_image_dataset
from .exposure_bias import exposure_bias
from .fid import FID, InceptionFeatures
from .flatness import DiffusionLoss, loss_surface, loss_under_perturbation, lpf_flatness
from .hub import files_to_push, push_to_hub
from .input_perturbation import noisy_input_and_target
from .memorization import memorization_ratio
from .model_card import build_model_card, write_model_card
from .models import PRESETS, build_unet, load_unet_config
from .quantization import load_quantized, quantize_for_deployment, quantize_weights_, save_quantized
from .sam import SAM
from .sampling import image_grid, sample_images
from .training import MicroBatch, StepStats, diffusion_loss, draw_step_noise, train_step

__version__ = "0.1.0"

__all__ = [
    "FID",
    "PRESETS",
    "SAM",
    "DataError",
    "DiffusionLoss",
    "InceptionFeatures",
    "ImageTransform",
    "MicroBatch",
    "StepBatchSampler",
    "StepStats",
    "TrainingImages",
    "averaged_unet",
    "build_model_card",
    "build_unet",
    "diffusion_loss",
    "draw_step_noise",
    "exposure_bias",
    "files_to_push",
    "image_grid",
    "list_checkpoints",
    "load_digits_dataset",
    "load_image_dataset",
    "load_quantized",
    "load_unet_config",
    "loss_surface",
    "loss_under_perturbation",
    "lpf_flatness",
    "make_ema",
    "make_swa",
    "memorization_ratio",
    "noisy_input_and_target",
    "push_to_hub",
    "quantize_for_deployment",
    "quantize_weights_",
    "resolve_checkpoint",
    "resolve_swa_start",
    "sample_images",
    "save_checkpoint",
    "save_pipeline",
    "save_quantized",
    "swa_due",
    "train_step",
    "write_model_card",
]
