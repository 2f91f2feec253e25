"""Evaluation of one diffusion model as a library: the samples every metric shares (FID columns at few and many
respaced steps, with and without quantized weights), then each metric the settings name, looked up in `METRICS`.

`evaluate` takes an already-loaded model (anything with the UNet's call signature and config: a trained UNet, its
EMA or SWA copy, a quantized copy, an empirical denoiser), its scheduler and the real images, and returns an
`Evaluation`. Run directories, reports and plots are `evaluation.runs` and `evaluation.report`.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import DDPMScheduler

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.real_images import RealImages
from diffusers_flat.evaluation.registry import METRICS, Evaluation, MetricInputs, measure_quantization
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.fid import FID, real_statistics_cached
from diffusers_flat.quantization import quantize_weights_
from diffusers_flat.sampling import sample_images


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` (CUDA when present, else the CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise FlatError(f"device {device!r}: use auto, cpu, cuda or cuda:N", "device")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise FlatError(f"device {device}: CUDA is not available on this machine; use cpu or auto", "device")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise FlatError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA devices", "device")
    return resolved


def set_fid_reference(fid: FID, real: RealImages, settings: EvaluationSettings, cache_dir: str | os.PathLike) -> None:
    """Give `fid` the statistics of the real images `evaluate` compares with, from `cache_dir` when computed
    before."""
    images = real.fid_subset(settings.num_real, settings.seed)
    # each feature network (and InceptionV3 at bf16) has statistics of its own
    features = getattr(fid.features, "key", None) or str(getattr(fid.features, "dtype", "")).removeprefix("torch.")
    real_statistics_cached(fid, images, cache_dir, {**real.key, "n": len(images), "features": features})


def evaluate(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    real: RealImages,
    settings: EvaluationSettings,
    fid: FID | None = None,
    processes: PartialState | None = None,
    reference: torch.nn.Module | None = None,
    classifier: torch.nn.Module | None = None,
) -> Evaluation:
    """Measure `settings.metrics` of `model`.

    Args:
        model: a UNet2DModel, or anything with its call signature and config.
        scheduler: the model's DDPMScheduler.
        real: the training images (`load_real_images`).
        settings: what to measure.
        fid: an FID whose real statistics are set (`set_fid_reference`, on the main process); needed for the fid
            metric.
        processes: accelerate's state when several processes evaluate together (`accelerate launch`): every process
            calls `evaluate`; each generates its share of the sample indices (image i has its own seed, so the images
            are those of one process) and computes their features; the images and features are gathered, and the main
            process scores them and measures everything else. The other processes get an empty result.
        reference: the pfd metric's reference model when `settings.pfd_reference` is a directory (the caller loads
            it); for "empirical", the empirical denoiser of the training images is built here unless given (e.g. its
            noise-unconditional variant, for a model trained without the noise level).
        classifier: labels the fp32 and quantized samples for class fidelity (`load_classifier`); None: not measured.

    Example:
        >>> from diffusers import DDPMPipeline  # doctest: +SKIP
        >>> pipeline = DDPMPipeline.from_pretrained("ddpm-flat-digits")  # doctest: +SKIP
        >>> real = load_real_images(DataSource(), 16, 1)  # doctest: +SKIP
        >>> evaluate(pipeline.unet, pipeline.scheduler, real, EvaluationSettings(metrics=("lpf",))).result["lpf"]
        ... # doctest: +SKIP
    """
    metrics, s = set(settings.metrics), settings
    is_main = processes is None or processes.is_main_process
    if "fid" in metrics and (fid is None or (is_main and fid.num_real == 0)):
        raise FlatError("fid: the fid metric needs an FID with its real statistics set (set_fid_reference)", "fid")
    model = model.eval()
    evaluation = Evaluation(result={})
    result = evaluation.result
    features: dict[tuple[str, int], torch.Tensor] = {}  # (level, T') -> features of the samples; "fp32": unquantized

    def generate(network: torch.nn.Module, level: str, steps: int) -> np.ndarray:
        """Samples (and their features) of `network` at T' = `steps`, split across the processes and gathered."""
        # accelerate's contiguous shares, in rank order: gathering them restores the order
        indices = list(range(s.num_samples))
        with processes.split_between_processes(indices) if processes else nullcontext(indices) as share:
            start = time.perf_counter()
            first = share[0] if share else 0
            # every level draws image i from the same generator as fp32: the same noises
            images = sample_images(
                network, scheduler, len(share), steps, s.seed, s.batch_size, is_main, first, sampler=s.sampler
            )
        seconds = time.perf_counter() - start
        feats = fid.features_of(images).cpu() if "fid" in metrics else None
        if processes is not None and processes.num_processes > 1:
            images = np.concatenate(gather_object([images]))
            feats = None if feats is None else torch.cat(gather_object([feats]))
        if feats is not None:
            features[level, steps] = feats
        if level == "fp32":
            result.setdefault("sampling_seconds", {})[str(steps)] = round(seconds, 2)
        return images

    if metrics & {"fid", "memorization"}:
        for steps in s.inference_steps if "fid" in metrics else [max(s.inference_steps)]:
            evaluation.samples[steps] = generate(model, "fp32", steps)
    quantized_models = {}
    for level, (bits, granularity) in s.quantization_levels.items():
        quantized = quantized_models[level] = copy.deepcopy(model)
        quantize_weights_(quantized, bits, granularity)
        for steps in s.quantize_inference_steps or s.inference_steps:
            evaluation.quantized_samples[level, steps] = generate(quantized, level, steps)
    if not is_main:
        return Evaluation(result={})
    inputs = MetricInputs(
        model, scheduler, real, settings, evaluation, fid, features, quantized_models, reference, classifier
    )
    for name, measure in METRICS.items():
        if name in metrics:
            measure(inputs)
    if s.quantize:  # FID before -> after quantization (the settings require the fid metric with it)
        measure_quantization(inputs)
    return evaluation
