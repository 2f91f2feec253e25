"""Evaluation of one diffusion model as a library: FID at few and many respaced steps (and with quantized weights),
LPF, loss under perturbation, the loss surface, exposure bias and memorization.

`evaluate` takes an already-loaded model (anything with the UNet's call signature and config: a trained UNet, its
EMA or SWA copy, a quantized copy), its scheduler and the real images, and returns an `EvaluationResult`, the one
definition of the results JSON. Directories, reports and plots belong to the caller (`evaluate_flat.py`).
"""

from __future__ import annotations

import copy
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import DDPMScheduler

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser
from diffusers_flat.metrics.exposure_bias import ExposureBiasResult, exposure_bias
from diffusers_flat.metrics.fid import FID, KIDResult, check_count, real_statistics_cached
from diffusers_flat.metrics.flatness import (
    DiffusionLoss,
    LossSurface,
    LPFResult,
    PerturbationCurve,
    loss_surface,
    loss_under_perturbation,
    lpf_flatness,
)
from diffusers_flat.metrics.memorization import MemorizationResult, memorization_ratio
from diffusers_flat.metrics.pfd import DESCRIPTORS, SOLVERS, PFDResult, pfd
from diffusers_flat.quantization import check_bits, check_granularity, quantize_weights_
from diffusers_flat.run_directory import DataSource
from diffusers_flat.training.data import ImageTransform, load_image_dataset, open_image, subset_indices
from diffusers_flat.utils.sampling import sample_images

METRICS = ("fid", "lpf", "perturbation", "surface", "exposure_bias", "memorization", "pfd")
DEFAULT_METRICS = METRICS[:-1]  # PFD needs a reference model: asked for by name


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


class QuantizationResult(TypedDict):
    """Robustness to b-bit weights, measured three ways, all paired with the fp32 model (same sampling noise, same
    (x0, t, eps) triples)."""

    granularity: str
    fid: dict[str, dict[str, float]]  # bits -> T' -> FID
    kid: dict[str, dict[str, KIDResult]]  # bits -> T' -> KID
    loss_increase: dict[str, float]  # bits -> L(quantized w) - L(w), the fixed diffusion loss
    pixel_displacement: dict[str, dict[str, float]]  # bits -> T' -> mean |quantized - fp32 sample| (0-255)


class EvaluationResult(TypedDict, total=False):
    """What `evaluate` measured, keyed as in `eval_results.json`; a metric that was not asked for is absent.
    FID columns and quantization bits are string keys (JSON object keys)."""

    model: str  # set by the caller: the name the model is reported under
    path: str  # set by the caller: where the model was loaded from
    variant: str  # set by the caller: raw, ema or swa
    fid: dict[str, float]  # T' -> FID
    kid: dict[str, KIDResult]  # T' -> KID, on the same features
    fid_num_generated: int
    fid_num_real: int
    sampling_seconds: dict[str, float]  # T' -> wall time of sampling
    quantization: QuantizationResult
    loss: float  # the fixed diffusion loss L(w)
    lpf: LPFResult
    perturbation: PerturbationCurve
    surface: LossSurface
    exposure_bias: ExposureBiasResult
    memorization: MemorizationResult
    pfd: PFDResult  # against pfd_reference
    pfd_reference: str  # a pipeline directory or "empirical"


@dataclass(frozen=True)
class RealImages:
    """The real images a model is compared with, prepared as in training (centre crop, no flip).

    Args:
        uint8: (N, H, W, C) uint8 pixels, for FID.
        tensors: (N, C, H, W) float in [-1, 1].
        key: what identifies the images for the FID statistics cache (dataset fingerprint, source, size, channels).
        training: the indices of the images the model trained on (a `--train_subset`), or None: all of them.
            FID compares with all the images; the losses, exposure bias, memorization and the empirical denoiser
            use the training images (`training_images`).
    """

    uint8: np.ndarray
    tensors: torch.Tensor
    key: dict
    training: np.ndarray | None = None

    def training_images(self) -> RealImages:
        """The images the model trained on."""
        if self.training is None:
            return self
        chosen = self.training
        return RealImages(
            self.uint8[chosen], self.tensors[torch.from_numpy(chosen)], {**self.key, "training": len(chosen)}
        )

    def order(self, seed: int) -> np.ndarray:
        """A fixed random order of the images: the same subsets serve every model evaluated with `seed`."""
        return np.random.default_rng(seed).permutation(len(self.uint8))

    def fid_subset(self, num_real: int, seed: int) -> np.ndarray:
        """At most `num_real` images, a random subset in dataset order."""
        return self.uint8[np.sort(self.order(seed)[:num_real])]

    def tensor_subset(self, count: int, seed: int) -> torch.Tensor:
        """The first `count` images of the fixed random order."""
        return self.tensors[torch.from_numpy(self.order(seed)[:count])]


def load_real_images(source: DataSource, resolution: int, channels: int) -> RealImages:
    """All images of a training set as a model of `resolution` and `channels` saw them (centre crop, no flip).

    Args:
        source: the dataset (a run's `TrainingRecord.data`).
        resolution: the model's image size.
        channels: the model's channels (1 or 3).

    Example:
        >>> real = load_real_images(DataSource(), 16, 1)  # the embedded digits
        >>> real.uint8.shape, real.tensors.shape
        ((1797, 16, 16, 1), torch.Size([1797, 1, 16, 16]))
    """
    dataset, _ = load_image_dataset(
        source.dataset_name, source.dataset_config_name, source.train_data_dir, source.image_column
    )
    transform = ImageTransform(resolution, center_crop=True, channels=channels)
    tensors = torch.stack([transform(open_image(record), random.Random(0)) for record in dataset[source.image_column]])
    uint8 = ((tensors + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # the key names the whole dataset: models trained on subsets of it share its FID statistics
    everything = {name: value for name, value in source.__dict__.items() if not name.startswith("train_subset")}
    key = {"dataset": dataset._fingerprint, "source": everything, "resolution": resolution, "channels": channels}
    subset = source.train_subset
    training = None if subset is None else subset_indices(len(tensors), subset, source.train_subset_seed)
    return RealImages(uint8, tensors, key, training)


@dataclass(frozen=True)
class EvaluationSettings:
    """What to measure and how much of it. Every field is checked when the settings are made.

    Args:
        metrics: any of METRICS (default: all but pfd).
        inference_steps: the respaced sampling steps T' of the FID columns (the paper: 20 and 100).
        num_samples: generated images per FID column (the paper: 50,000).
        num_real: at most this many real images for FID.
        quantize: also FID with weights quantized to these bits (2-8; the paper's Table 4: 8).
        quantize_granularity: per_tensor (the paper) or per_channel scales.
        quantize_inference_steps: the FID columns T' also sampled with quantized weights (empty: every column).
        seed: seeds the sampling noise, the real subsets, the (x0, t, eps) triples and the weight noise.
        batch_size: images per UNet batch.
        loss_samples: (x0, t, eps) triples of the fixed diffusion loss.
        lpf_sigma: LPF's noise scale sigma.
        lpf_draws: LPF's Monte Carlo draws K.
        gammas: radii of the loss-under-perturbation curve.
        directions: random directions the curve averages over.
        surface_extent: the loss surface spans [-extent, extent] along each direction.
        surface_resolution: points per axis of the loss surface.
        exposure_samples: sampling chains (and real images) of the exposure-bias measurement.
        pfd_reference: the pfd metric's reference: a pipeline directory, or "empirical" (the training set's
            empirical denoiser, E_mem).
        pfd_noises: the shared starting noises of PFD.
        pfd_steps: the PF-ODE solver's steps.
        pfd_solver: "ddim" (eta = 0) or "dpm-solver++".
        pfd_descriptor: "pixels" or "inception" (with the fid metric, which brings InceptionV3).

    Example:
        >>> EvaluationSettings(metrics=("lpf",), lpf_draws=5).lpf_draws
        5
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    inference_steps: tuple[int, ...] = (20, 100)
    num_samples: int = 1000
    num_real: int = 1000
    quantize: tuple[int, ...] = ()
    quantize_granularity: str = "per_tensor"
    quantize_inference_steps: tuple[int, ...] = ()
    seed: int = 0
    batch_size: int = 250
    loss_samples: int = 256
    lpf_sigma: float = 0.01
    lpf_draws: int = 100
    gammas: tuple[float, ...] = (0, 10, 20, 30, 40, 50)
    directions: int = 3
    surface_extent: float = 0.5
    surface_resolution: int = 9
    exposure_samples: int = 128
    pfd_reference: str | None = None
    pfd_noises: int = 1000
    pfd_steps: int = 50
    pfd_solver: str = "ddim"
    pfd_descriptor: str = "pixels"

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise FlatError(f"metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}", "metrics")
        if "fid" in self.metrics:
            check_count(self.num_samples, "num_samples")
        if not self.inference_steps or any(s < 1 for s in self.inference_steps):
            raise FlatError(f"inference_steps must be >= 1, got {list(self.inference_steps)}", "inference_steps")
        for bits in self.quantize:
            check_bits(bits)
        if self.quantize and "fid" not in self.metrics:
            raise FlatError("quantize reports FID before -> after quantization: add fid to metrics", "quantize")
        check_granularity(self.quantize_granularity)
        if "pfd" in self.metrics:
            check_pfd_settings(self)
        extra = [s for s in self.quantize_inference_steps if s not in self.inference_steps]
        if extra:
            raise FlatError(
                f"quantize_inference_steps must be among inference_steps {list(self.inference_steps)}, got {extra}",
                "quantize_inference_steps",
            )
        for name in (
            "num_real",
            "batch_size",
            "loss_samples",
            "lpf_draws",
            "directions",
            "surface_resolution",
            "exposure_samples",
        ):
            if getattr(self, name) < 1:
                raise FlatError(f"{name} must be >= 1, got {getattr(self, name)}", name)


def evaluation_work(s: EvaluationSettings) -> tuple[int, int]:
    """What `evaluate` costs for one model: (UNet image-forwards, InceptionV3 images). A sampling step of one image
    is one forward, and so is one (x0, t, eps) term of the fixed loss; the real images' features are extra, once.

    Example:
        >>> evaluation_work(EvaluationSettings(metrics=("fid",), inference_steps=(20,), num_samples=100))
        (2000, 100)
    """
    metrics = set(s.metrics)
    columns = [(t, 1) for t in s.inference_steps] if "fid" in metrics else []
    if "memorization" in metrics and not columns:
        columns = [(max(s.inference_steps), 1)]  # samples without their features
    columns += [(t, len(s.quantize)) for t in (s.quantize_inference_steps or s.inference_steps) if s.quantize]
    forwards = s.num_samples * sum(t * copies for t, copies in columns)
    images = s.num_samples * sum(copies for _, copies in columns) if "fid" in metrics else 0
    flatness = metrics & {"lpf", "perturbation", "surface"}
    losses = (1 + len(s.quantize) if s.quantize or flatness else 0) + s.lpf_draws * ("lpf" in metrics)
    losses += len(s.gammas) * s.directions * ("perturbation" in metrics)
    losses += s.surface_resolution**2 * ("surface" in metrics)
    forwards += losses * s.loss_samples
    if "exposure_bias" in metrics:  # each step: the chain's image and the freshly noised real one
        forwards += 2 * s.exposure_samples * max(s.inference_steps)
    if "pfd" in metrics:  # the model's and the reference's flow maps; an empirical reference costs more than a UNet
        forwards += 2 * s.pfd_noises * s.pfd_steps
        images += 2 * s.pfd_noises * (s.pfd_descriptor == "inception")
    return forwards, images


def check_pfd_settings(s: EvaluationSettings) -> None:
    if not s.pfd_reference:
        raise FlatError("pfd_reference: the pfd metric needs a pipeline directory or 'empirical'", "pfd_reference")
    if s.pfd_solver not in SOLVERS:
        raise FlatError(f"pfd_solver must be one of {', '.join(SOLVERS)}, got {s.pfd_solver!r}", "pfd_solver")
    if s.pfd_descriptor not in DESCRIPTORS:
        raise FlatError(
            f"pfd_descriptor must be one of {', '.join(DESCRIPTORS)}, got {s.pfd_descriptor!r}", "pfd_descriptor"
        )
    if s.pfd_descriptor == "inception" and "fid" not in s.metrics:
        raise FlatError("pfd_descriptor inception: add fid to metrics, which brings InceptionV3", "pfd_descriptor")
    if s.pfd_noises < 2 or s.pfd_steps < 1:
        raise FlatError(
            f"pfd_noises must be >= 2 and pfd_steps >= 1, got {s.pfd_noises} and {s.pfd_steps}", "pfd_noises"
        )


@dataclass
class Evaluation:
    """An `EvaluationResult` and the images behind it, for the caller's grids and plots."""

    result: EvaluationResult
    samples: dict[int, np.ndarray] = field(default_factory=dict)  # T' -> generated uint8 NHWC
    quantized_samples: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (bits, T') -> images
    nearest: list[int] = field(default_factory=list)  # memorization: each sample's nearest real image


def set_fid_reference(fid: FID, real: RealImages, settings: EvaluationSettings, cache_dir: str | os.PathLike) -> None:
    """Give `fid` the statistics of the real images `evaluate` compares with, from `cache_dir` when computed
    before."""
    images = real.fid_subset(settings.num_real, settings.seed)
    # bf16 features have statistics of their own
    dtype = str(getattr(fid.features, "dtype", "")).removeprefix("torch.")
    real_statistics_cached(fid, images, cache_dir, {**real.key, "n": len(images), "features": dtype})


def evaluate(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    real: RealImages,
    settings: EvaluationSettings,
    fid: FID | None = None,
    processes: PartialState | None = None,
    reference: torch.nn.Module | None = None,
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
    features: dict[tuple[int, int], torch.Tensor] = {}  # (bits, T') -> features of the samples; bits 32: unquantized

    def generate(network: torch.nn.Module, bits: int, steps: int) -> np.ndarray:
        """Samples (and their features) of `network` at T' = `steps`, split across the processes and gathered."""
        # accelerate's contiguous shares, in rank order: gathering them restores the order
        indices = list(range(s.num_samples))
        with processes.split_between_processes(indices) if processes else nullcontext(indices) as share:
            start = time.perf_counter()
            first = share[0] if share else 0
            images = sample_images(
                network, scheduler, len(share), steps, s.seed, s.batch_size, show_progress=is_main, first_index=first
            )
        seconds = time.perf_counter() - start
        feats = fid.features_of(images).cpu() if "fid" in metrics else None
        if processes is not None and processes.num_processes > 1:
            images = np.concatenate(gather_object([images]))
            feats = None if feats is None else torch.cat(gather_object([feats]))
        if feats is not None:
            features[bits, steps] = feats
        if bits == 32:
            result.setdefault("sampling_seconds", {})[str(steps)] = round(seconds, 2)
        return images

    if metrics & {"fid", "memorization"}:
        for steps in s.inference_steps if "fid" in metrics else [max(s.inference_steps)]:
            evaluation.samples[steps] = generate(model, 32, steps)
    quantized_models = {}
    for bits in s.quantize:
        quantized = quantized_models[bits] = copy.deepcopy(model)
        quantize_weights_(quantized, bits, s.quantize_granularity)
        for steps in s.quantize_inference_steps or s.inference_steps:
            evaluation.quantized_samples[bits, steps] = generate(quantized, bits, steps)
    if not is_main:
        return Evaluation(result={})

    if "fid" in metrics:
        scores = {str(steps): fid.scores_of_features(features[32, steps], s.seed) for steps in evaluation.samples}
        result["fid"] = {steps: score["fid"] for steps, score in scores.items()}
        result["kid"] = {steps: score["kid"] for steps, score in scores.items()}
        result["fid_num_generated"] = s.num_samples
        result["fid_num_real"] = fid.num_real
    training = real.training_images()  # FID compares with all the real images; the rest with the training ones
    triples = training.tensor_subset(min(s.loss_samples, len(training.tensors)), s.seed)
    loss = DiffusionLoss(scheduler, triples, seed=s.seed, batch_size=s.batch_size)
    flatness_metrics = metrics & {"lpf", "perturbation", "surface"}
    fp32_loss = loss(model) if s.quantize or flatness_metrics else None
    if s.quantize:
        q = result["quantization"] = {"granularity": s.quantize_granularity, "fid": {}, "kid": {}}
        q.update(loss_increase={}, pixel_displacement={})
        for bits in s.quantize:
            fids, kids, moved = {}, {}, {}
            q["fid"][str(bits)], q["kid"][str(bits)], q["pixel_displacement"][str(bits)] = fids, kids, moved
            q["loss_increase"][str(bits)] = loss(quantized_models[bits]) - fp32_loss
            for steps in s.quantize_inference_steps or s.inference_steps:
                score = fid.scores_of_features(features[bits, steps], s.seed)
                fids[str(steps)], kids[str(steps)] = score["fid"], score["kid"]
                a, b = evaluation.samples[steps], evaluation.quantized_samples[bits, steps]
                moved[str(steps)] = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    if flatness_metrics:
        result["loss"] = fp32_loss
        if "lpf" in metrics:
            result["lpf"] = lpf_flatness(model, loss, sigma=s.lpf_sigma, num_draws=s.lpf_draws, seed=s.seed)
        if "perturbation" in metrics:
            result["perturbation"] = loss_under_perturbation(model, loss, list(s.gammas), s.directions, s.seed)
        if "surface" in metrics:
            result["surface"] = loss_surface(model, loss, s.surface_extent, s.surface_resolution, s.seed)
    if "exposure_bias" in metrics:
        images = training.tensor_subset(min(s.exposure_samples, len(training.tensors)), s.seed)
        result["exposure_bias"] = exposure_bias(
            model, scheduler, images, max(s.inference_steps), seed=s.seed, batch_size=s.batch_size
        )
    if "memorization" in metrics:
        memo = memorization_ratio(evaluation.samples[max(evaluation.samples)], training.uint8)
        evaluation.nearest = memo["nearest"]
        result["memorization"] = {k: memo[k] for k in MemorizationResult.__annotations__}
    if "pfd" in metrics:
        if s.pfd_reference == "empirical" and reference is None:  # E_mem: the training set's own denoiser at T = 1
            reference = EmpiricalDenoiser.from_training_set(training.tensors, scheduler).to(model.device)
        elif reference is None:
            raise FlatError(f"reference: pass the model of pfd_reference {s.pfd_reference}", "reference")
        inception = fid.features if s.pfd_descriptor == "inception" else None
        result["pfd"] = pfd(
            model,
            reference,
            scheduler.config,
            s.pfd_noises,
            s.pfd_steps,
            s.pfd_solver,
            s.pfd_descriptor,
            s.seed,
            s.batch_size,
            inception,
        )
        result["pfd_reference"] = s.pfd_reference
    return evaluation
