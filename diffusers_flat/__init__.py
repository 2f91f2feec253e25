"""diffusers-flat: train diffusers DDPMs toward flat minima and measure what flatness buys.

Importing the package imports nothing heavy: each name below is loaded from its module on first use (as diffusers
does), so `import diffusers_flat.quantization` pulls in torch, diffusers and torchao only, not datasets, accelerate,
torchmetrics or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module (file) it lives in
_EXPORTS = {
    "methods.averaging": ["averaged_unet", "make_ema", "make_swa", "resolve_swa_start", "swa_due"],
    "training.checkpointing": ["save_checkpoint", "save_pipeline"],
    "data.images": ["DataError", "ImageTransform", "load_digits_dataset", "load_image_dataset"],
    "training.sample_stream": ["StepBatchSampler", "TrainingImages"],
    "errors": ["FlatError"],
    "evaluation.evaluate": ["evaluate", "set_fid_reference"],
    "evaluation.measurements": ["Level", "Measurements", "read_results"],
    "evaluation.real_images": ["RealImages", "load_real_images"],
    "evaluation.registry": ["METRICS", "Evaluation", "EvaluationResult"],
    "evaluation.settings": ["EvaluationSettings"],
    "metrics.exposure_bias": ["exposure_bias"],
    "metrics.fid": ["FID", "InceptionFeatures"],
    "metrics.flatness": ["DiffusionLoss", "loss_surface", "loss_under_perturbation", "lpf_flatness"],
    "hub.push": ["push_to_hub"],
    "methods.input_perturbation": ["noisy_input_and_target"],
    "methods.learned_variance": ["hybrid_loss", "vlb_term"],
    "metrics.memorization": ["memorization_ratio"],
    "hub.model_card": ["build_model_card", "write_model_card"],
    "training.models": ["PRESETS", "build_unet", "load_unet_config"],
    "quantization": ["load_quantized", "quantize_for_deployment", "quantize_weights_", "save_quantized"],
    "run_directory": ["DataSource", "RunDirectory", "write_atomically", "write_json"],
    "training.config": ["TrainingConfig", "TrainingRecord", "training_config"],
    "methods.sam": ["SAM"],
    "methods.sam_modes": ["SAMMode", "SAM_MODES", "sam_mode"],
    "sampling": ["image_grid", "pipeline_samples", "sample_images", "to_uint8"],
    "methods.timestep_sampler": ["LossSecondMomentSampler", "importance_weights"],
    "training.step": ["MicroBatch", "StepStats", "diffusion_loss", "draw_step_noise", "seed_dropout", "train_step"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'diffusers_flat' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
