"""The metrics `evaluate` knows, in one table: name -> the function that measures it from a `MetricInputs`, and the
one definition of the results JSON (`EvaluationResult`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypedDict

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.real_images import RealImages
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.class_fidelity import ClassFidelity, class_fidelity, classify
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser, find_collapse_sigma
from diffusers_flat.metrics.exposure_bias import ExposureBiasResult, exposure_bias
from diffusers_flat.metrics.fid import FID, KIDResult
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
from diffusers_flat.metrics.pfd import PFDResult, pfd
from diffusers_flat.metrics.quantization_sensitivity import SensitivityResult, quantization_sensitivity


class QuantizedLevel(TypedDict):
    """One quantization level, paired with the fp32 model (the same sampling noises, the same (x0, t, eps) triples)."""

    bits: int
    granularity: str
    fid: dict[str, float]  # T' -> FID
    kid: dict[str, KIDResult]  # T' -> KID, on the same features
    loss_increase: float  # L(quantized w) - L(w), the fixed diffusion loss
    pixel_displacement: dict[str, float]  # T' -> mean |quantized - fp32 sample| (0-255)
    class_fidelity: dict[str, ClassFidelity]  # T' -> class fidelity, with a classifier


class QuantizationResult(TypedDict):
    """Robustness to quantized weights at each level ("B:granularity"), with the sampler of both columns."""

    sampler: str
    levels: dict[str, QuantizedLevel]


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
    sampler: str  # the pipeline sampler of the FID columns: ddpm or ddim
    sampling_seconds: dict[str, float]  # T' -> wall time of sampling
    quantization: QuantizationResult
    loss: float  # the fixed diffusion loss L(w)
    lpf: LPFResult
    perturbation: PerturbationCurve
    surface: LossSurface
    exposure_bias: ExposureBiasResult
    memorization: MemorizationResult
    pfd: PFDResult  # against pfd_reference
    pfd_reference: str  # a pipeline directory, "empirical" or "smoothed"
    pfd_smoothing: dict  # "smoothed": the collapse level sigma_c (None: no collapse) and the neighbours K it used
    sensitivity: SensitivityResult  # the quantization ladder


@dataclass
class Evaluation:
    """An `EvaluationResult` and the images behind it, for the caller's grids and plots."""

    result: EvaluationResult
    samples: dict[int, np.ndarray] = field(default_factory=dict)  # T' -> generated uint8 NHWC
    quantized_samples: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (level, T') -> images
    nearest: list[int] = field(default_factory=list)  # memorization: each sample's nearest real image


@dataclass
class MetricInputs:
    """What a metric reads: the model and its scheduler, the data, the settings, the samples drawn for FID and
    memorization, and the result it writes into (`evaluation.result`).

    Args:
        model: the model under evaluation (eval mode).
        scheduler: its DDPMScheduler.
        real: all the real images; the losses, exposure bias and memorization use `real.training_images()`.
        settings: what to measure (`EvaluationSettings`).
        evaluation: the samples (T' -> uint8 NHWC) and the result being filled.
        fid: the FID with its real statistics set, for the fid metric.
        features: (level, T') -> InceptionV3 features of the samples; level "fp32": unquantized.
        quantized: level ("B:granularity") -> the model with quantized weights.
        reference: the pfd metric's reference model, when the caller gives one.
        classifier: labels the samples for class fidelity (`settings.classifier`), when the caller gives one.
    """

    model: torch.nn.Module
    scheduler: DDPMScheduler
    real: RealImages
    settings: EvaluationSettings
    evaluation: Evaluation
    fid: FID | None = None
    features: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    quantized: dict[str, torch.nn.Module] = field(default_factory=dict)
    reference: torch.nn.Module | None = None
    classifier: torch.nn.Module | None = None

    @cached_property
    def training(self) -> RealImages:
        return self.real.training_images()

    @cached_property
    def loss(self) -> DiffusionLoss:
        """The fixed diffusion loss: the same (x0, t, eps) triples for every model and perturbation."""
        s = self.settings
        triples = self.training.tensor_subset(min(s.loss_samples, len(self.training.tensors)), s.seed)
        return DiffusionLoss(self.scheduler, triples, seed=s.seed, batch_size=s.batch_size)

    @cached_property
    def labels(self) -> dict[int, np.ndarray]:
        """The classifier's labels of the fp32 samples of each T'."""
        return {steps: classify(self.classifier, images) for steps, images in self.evaluation.samples.items()}

    @cached_property
    def reference_counts(self) -> np.ndarray:
        """The classifier's class histogram of the held-out images (else the training images)."""
        reference = self.real.held_out if self.real.held_out is not None else self.training.uint8
        return np.bincount(classify(self.classifier, reference), minlength=self.classifier.config.num_labels)

    @cached_property
    def fp32_loss(self) -> float:
        """L(w) of the unquantized, unperturbed model."""
        return self.loss(self.model)


def measure_fid(m: MetricInputs) -> None:
    """FID, KID and improved precision/recall of each T' column, on the same features (InceptionV3's, or DINOv2's
    with `settings.features`)."""
    scores = {str(t): m.fid.scores_of_features(m.features["fp32", t], m.settings.seed) for t in m.evaluation.samples}
    m.evaluation.result["fid"] = {t: score["fid"] for t, score in scores.items()}
    m.evaluation.result["kid"] = {t: score["kid"] for t, score in scores.items()}
    m.evaluation.result["precision_recall"] = {t: score["precision_recall"] for t, score in scores.items()}
    s = m.settings
    m.evaluation.result["features"] = s.features if s.features == "inception" else f"dinov2 ({s.dinov2_model})"
    m.evaluation.result["fid_num_generated"] = m.settings.num_samples
    m.evaluation.result["fid_num_real"] = m.fid.num_real
    m.evaluation.result["sampler"] = s.sampler


def measure_quantization(m: MetricInputs) -> None:
    """Each level against fp32, paired: FID/KID, the fixed loss's increase, the samples' pixel displacement."""
    s, samples = m.settings, m.evaluation.samples
    levels = {}
    for level, (bits, granularity) in s.quantization_levels.items():
        fids, kids, moved = {}, {}, {}
        for steps in s.quantize_inference_steps or s.inference_steps:
            score = m.fid.scores_of_features(m.features[level, steps], s.seed)
            fids[str(steps)], kids[str(steps)] = score["fid"], score["kid"]
            a, b = samples[steps], m.evaluation.quantized_samples[level, steps]
            moved[str(steps)] = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
        loss_increase = m.loss(m.quantized[level]) - m.fp32_loss
        levels[level] = {"bits": bits, "granularity": granularity, "fid": fids, "kid": kids}
        levels[level] |= {"loss_increase": loss_increase, "pixel_displacement": moved}
        if m.classifier is not None:  # the same noises at fp32 and quantized: does each sample keep its class?
            levels[level]["class_fidelity"] = {
                str(steps): class_fidelity(m.labels[steps], classify(m.classifier, quantized), m.reference_counts)
                for (at, steps), quantized in m.evaluation.quantized_samples.items()
                if at == level
            }
    m.evaluation.result["quantization"] = {"sampler": s.sampler, "levels": levels}


def measure_lpf(m: MetricInputs) -> None:
    s = m.settings
    m.evaluation.result["loss"] = m.fp32_loss
    m.evaluation.result["lpf"] = lpf_flatness(m.model, m.loss, sigma=s.lpf_sigma, num_draws=s.lpf_draws, seed=s.seed)


def measure_perturbation(m: MetricInputs) -> None:
    s = m.settings
    m.evaluation.result["loss"] = m.fp32_loss
    m.evaluation.result["perturbation"] = loss_under_perturbation(
        m.model, m.loss, list(s.gammas), s.directions, s.seed
    )


def measure_surface(m: MetricInputs) -> None:
    s = m.settings
    m.evaluation.result["loss"] = m.fp32_loss
    m.evaluation.result["surface"] = loss_surface(m.model, m.loss, s.surface_extent, s.surface_resolution, s.seed)


def measure_exposure_bias(m: MetricInputs) -> None:
    s = m.settings
    images = m.training.tensor_subset(min(s.exposure_samples, len(m.training.tensors)), s.seed)
    m.evaluation.result["exposure_bias"] = exposure_bias(
        m.model, m.scheduler, images, max(s.inference_steps), seed=s.seed, batch_size=s.batch_size
    )


def measure_memorization(m: MetricInputs) -> None:
    """The memorization ratio of the samples of the largest T' against the training images, beside the data's own:
    the ratio of as many held-out real images (a random draw of the held-out split) against the same images."""
    samples = m.evaluation.samples[max(m.evaluation.samples)]
    memo = memorization_ratio(samples, m.training.uint8)
    held_out = m.real.held_out
    if held_out is not None:
        drawn = held_out[np.random.default_rng(m.settings.seed).permutation(len(held_out))[: len(samples)]]
        memo["held_out_ratio"] = memorization_ratio(drawn, m.training.uint8)["memorization_ratio"]
    m.evaluation.nearest = memo["nearest"]
    m.evaluation.result["memorization"] = {k: memo.get(k) for k in MemorizationResult.__annotations__}


def measure_sensitivity(m: MetricInputs) -> None:
    """The quantization-sensitivity curve: loss increase and pixel displacements at each ladder level."""
    s = m.settings
    ladder = (s.ladder, s.ladder_granularities, s.ladder_samples, s.ladder_steps, s.seed, s.batch_size)
    m.evaluation.result["sensitivity"] = quantization_sensitivity(
        m.model, m.scheduler, m.loss, *ladder, sampler=s.ladder_sampler
    )


# pfd_reference values that name a closed-form reference built from the model's own training images
EMPIRICAL_REFERENCES = ("empirical", "smoothed")


def empirical_reference(
    real: RealImages,
    scheduler: DDPMScheduler,
    device: str | torch.device,
    temperature: float = 1.0,
    noise_unconditional: bool = False,
) -> EmpiricalDenoiser:
    """The empirical denoiser of the images a model trained on (`real.training_images()`), on `device`: PFD's E_mem
    reference (temperature 1), and what a generalization study sweeps over temperatures."""
    images = real.training_images().tensors
    denoiser = EmpiricalDenoiser.from_training_set(
        images, scheduler, temperature, noise_unconditional=noise_unconditional
    )
    return denoiser.to(device)


def smoothed_reference(
    real: RealImages, scheduler: DDPMScheduler, device: str | torch.device, neighbours: int = 30
) -> tuple[EmpiricalDenoiser, float | None]:
    """The paper's smoothed empirical score of the images a model trained on (arXiv 2601.19285): tempered as
    T_t = max(sigma_c / sigma_t, 1) below the collapse level sigma_c that `find_collapse_sigma` finds for these
    images, the softmax over the `neighbours` nearest (all of them when fewer), in pixels. Returns it and sigma_c;
    where the plain denoiser never collapses (sigma_c None) there is nothing to temper and T = 1 throughout."""
    images = real.training_images().tensors
    sigma_c = find_collapse_sigma(images, scheduler)["collapse_sigma"]
    tempering = {"tempering": "collapse", "collapse_sigma": sigma_c} if sigma_c is not None else {}
    k = min(neighbours, len(images))
    denoiser = EmpiricalDenoiser.from_training_set(images, scheduler, neighbours=k, **tempering)
    return denoiser.to(device), sigma_c


def measure_pfd(m: MetricInputs) -> None:
    s, reference, smoothing = m.settings, m.reference, {}
    if s.pfd_reference == "empirical" and reference is None:  # E_mem: the training set's own denoiser at T = 1
        reference = empirical_reference(m.real, m.scheduler, m.model.device)
    elif s.pfd_reference == "smoothed" and reference is None:
        reference, sigma_c = smoothed_reference(m.real, m.scheduler, m.model.device, s.pfd_neighbours)
        smoothing = {"collapse_sigma": sigma_c, "neighbours": reference.config.neighbours}
    elif reference is None:
        raise FlatError(f"reference: pass the model of pfd_reference {s.pfd_reference}", "reference")
    inception = m.fid.features if s.pfd_descriptor == "inception" else None
    m.evaluation.result["pfd"] = pfd(
        m.model,
        reference,
        m.scheduler.config,
        s.pfd_noises,
        s.pfd_steps,
        s.pfd_solver,
        s.pfd_descriptor,
        s.seed,
        s.batch_size,
        inception,
    )
    m.evaluation.result["pfd_reference"] = s.pfd_reference
    if smoothing:
        m.evaluation.result["pfd_smoothing"] = smoothing


# name -> what measures it, for each name `settings.METRIC_NAMES` lists. Adding a metric is its name there, one entry
# here, and its fields in EvaluationSettings/EvaluationResult.
METRICS: dict[str, Callable[[MetricInputs], None]] = {
    "fid": measure_fid,
    "lpf": measure_lpf,
    "perturbation": measure_perturbation,
    "surface": measure_surface,
    "exposure_bias": measure_exposure_bias,
    "memorization": measure_memorization,
    "pfd": measure_pfd,
    "sensitivity": measure_sensitivity,
}
