"""What an evaluation measures and how much of it: `EvaluationSettings`, checked when made, and what it costs."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.dinov2 import DEFAULT_DINOV2
from diffusers_flat.metrics.fid import FEATURE_SPACES, check_count
from diffusers_flat.metrics.pfd import DESCRIPTORS
from diffusers_flat.quantization import GRANULARITIES, check_bits, check_granularity
from diffusers_flat.sampling import SOLVERS, check_sampler

# What an evaluation may measure; `registry.METRICS` says how, one function for each of these names.
METRIC_NAMES = ("fid", "lpf", "perturbation", "surface", "exposure_bias", "memorization", "pfd", "sensitivity")
# asked for by name: PFD needs a reference model, the quantization ladder is a study's instrument
ON_REQUEST = ("pfd", "sensitivity")
DEFAULT_METRICS = tuple(name for name in METRIC_NAMES if name not in ON_REQUEST)


@dataclass(frozen=True)
class EvaluationSettings:
    """What to measure and how much of it. Every field is checked when the settings are made.

    Args:
        metrics: any of METRIC_NAMES (default: all but pfd and sensitivity, asked for by name).
        inference_steps: the respaced sampling steps T' of the FID columns (the paper: 20 and 100).
        num_samples: generated images per FID column (the paper: 50,000).
        num_real: at most this many real images for FID.
        sampler: the pipeline sampler of the FID columns, fp32 and quantized: "ddpm" (DDPMPipeline, respaced
            ancestral sampling: the paper's) or "ddim" (DDIMPipeline, eta = 0), each with the model's scheduler config.
        quantize: also FID and KID with quantized weights, from the same noises as fp32, at these levels: "B" (B bits
            at `quantize_granularity`) or "B:granularity", e.g. ("5:per_channel", "4:per_channel"); B from 2 to 8
            (the paper's Table 4: 8 per tensor).
        quantize_granularity: the granularity of a bare "B": per_tensor (the paper) or per_channel scales.
        quantize_inference_steps: the FID columns T' also sampled with quantized weights (empty: every column).
        classifier: with `quantize`, also class fidelity: the classifier ("fashion-mnist", the one shipped, or a
            `ResNetForImageClassification` directory) labels the fp32 and quantized samples (None: not measured).
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
        pfd_reference: the pfd metric's reference: a pipeline directory, "empirical" (the training set's
            empirical denoiser at T = 1, E_mem) or "smoothed" (the paper's smoothed empirical score of the training
            set: tempered below its collapse noise level, over the `pfd_neighbours` nearest images).
        pfd_neighbours: K of the "smoothed" reference (the paper's 30), at most the training images.
        pfd_noises: the shared starting noises of PFD.
        pfd_steps: the PF-ODE solver's steps.
        pfd_solver: "ddim" (eta = 0) or "dpm-solver++".
        pfd_descriptor: "pixels" (L2-normalised), "identity" (raw pixels) or "inception" (with the fid metric, which
            brings InceptionV3).
        ladder: the bits of the quantization-sensitivity curve (the sensitivity metric), e.g. 8, 6, 5, 4, 3.
        ladder_granularities: the scales of each ladder level: per_tensor and/or per_channel.
        ladder_samples: samples of each ladder level's pixel displacements.
        ladder_steps: the steps of those samples (the pipeline samplers' and the PF-ODE's); a divisor of the
            training timesteps.
        ladder_sampler: the pipeline sampler of the ladder's primary displacement: "ddim" (DDIMPipeline, eta = 0,
            what a user samples with) or "ddpm".
        features: the feature space of FID, KID and precision/recall: "inception" (the TF-ported InceptionV3) or
            "dinov2" (FD_DINOv2 and the rest in DINOv2's space).
        dinov2_model: with features "dinov2", the DINOv2 model's Hub id or local directory.

    Example:
        >>> EvaluationSettings(metrics=("lpf",), lpf_draws=5).lpf_draws
        5
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    inference_steps: tuple[int, ...] = (20, 100)
    num_samples: int = 1000
    num_real: int = 1000
    sampler: str = "ddpm"
    quantize: tuple[str, ...] = ()
    quantize_granularity: str = "per_tensor"
    quantize_inference_steps: tuple[int, ...] = ()
    classifier: str | None = None
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
    pfd_neighbours: int = 30
    pfd_noises: int = 1000
    pfd_steps: int = 50
    pfd_solver: str = "ddim"
    pfd_descriptor: str = "pixels"
    ladder: tuple[int, ...] = (8, 6, 5, 4, 3)
    ladder_granularities: tuple[str, ...] = ("per_tensor", "per_channel")
    ladder_samples: int = 64
    ladder_steps: int = 50
    ladder_sampler: str = "ddim"
    features: str = "inception"
    dinov2_model: str = DEFAULT_DINOV2

    @property
    def quantization_levels(self) -> dict[str, tuple[int, str]]:
        """The `quantize` levels by their key in the results ("B:granularity"): (bits, granularity)."""
        levels = [quantization_level(level, self.quantize_granularity) for level in self.quantize]
        return {f"{bits}:{granularity}": (bits, granularity) for bits, granularity in levels}

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        if unknown:
            raise FlatError(f"metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}", "metrics")
        if "fid" in self.metrics:
            check_count(self.num_samples, "num_samples")
        if not self.inference_steps or any(s < 1 for s in self.inference_steps):
            raise FlatError(f"inference_steps must be >= 1, got {list(self.inference_steps)}", "inference_steps")
        check_sampler(self.sampler)
        check_sampler(self.ladder_sampler, parameter="ladder_sampler")
        check_granularity(self.quantize_granularity)
        if self.classifier and not self.quantize:
            raise FlatError("classifier labels quantized samples: name the levels with quantize", "classifier")
        levels = [quantization_level(level, self.quantize_granularity) for level in self.quantize]
        if len(set(levels)) < len(levels):
            raise FlatError(f"quantize names a level twice: {', '.join(map(str, self.quantize))}", "quantize")
        if self.quantize and "fid" not in self.metrics:
            raise FlatError("quantize reports FID before -> after quantization: add fid to metrics", "quantize")
        if self.features not in FEATURE_SPACES:
            raise FlatError(f"features {self.features!r}: choose {' or '.join(FEATURE_SPACES)}", "features")
        if "pfd" in self.metrics:
            check_pfd_settings(self)
        if "sensitivity" in self.metrics:
            if not self.ladder or not self.ladder_granularities:
                raise FlatError("ladder: the sensitivity metric needs bits and granularities", "ladder")
            try:
                for bits in self.ladder:
                    check_bits(bits)
            except FlatError as err:
                raise FlatError(f"ladder {err}", "ladder") from None
            try:
                for granularity in self.ladder_granularities:
                    check_granularity(granularity)
            except FlatError as err:
                raise FlatError(f"ladder_granularities {err}", "ladder_granularities") from None
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
            "ladder_samples",
            "ladder_steps",
        ):
            if getattr(self, name) < 1:
                raise FlatError(f"{name} must be >= 1, got {getattr(self, name)}", name)


def quantization_level(level: str | int, granularity: str = "per_tensor") -> tuple[int, str]:
    """A `quantize` level as (bits, granularity): "B:granularity", or a bare B at `granularity`.

    Example:
        >>> quantization_level("4:per_channel"), quantization_level("8")
        ((4, 'per_channel'), (8, 'per_tensor'))
    """
    bits, _, named = str(level).partition(":")
    try:
        bits = int(bits)
    except ValueError:
        bits = None
    if bits is None or not 2 <= bits <= 8 or (named and named not in GRANULARITIES):
        raise FlatError(
            f"quantize level {level!r}: B or B:granularity, B from 2 to 8, granularity {' or '.join(GRANULARITIES)}",
            "quantize",
        )
    return bits, named or granularity


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
    if "sensitivity" in metrics:  # fp32 once and each level: the fixed loss, the PF-ODE's, ancestral and DDIM samples
        levels = len(s.ladder) * len(s.ladder_granularities)
        draws = 2 if s.ladder_sampler == "ddpm" else 3  # ddpm's samples are the ancestral ones
        forwards += (levels + 1) * (s.loss_samples + draws * s.ladder_samples * s.ladder_steps)
    if "pfd" in metrics:  # the model's and the reference's flow maps; an empirical reference costs more than a UNet
        forwards += 2 * s.pfd_noises * s.pfd_steps
        images += 2 * s.pfd_noises * (s.pfd_descriptor == "inception")
    return forwards, images


def check_pfd_settings(s: EvaluationSettings) -> None:
    if not s.pfd_reference:
        raise FlatError(
            "pfd_reference: the pfd metric needs a pipeline directory, 'empirical' or 'smoothed'", "pfd_reference"
        )
    if s.pfd_neighbours < 1:
        raise FlatError(f"pfd_neighbours must be >= 1, got {s.pfd_neighbours}", "pfd_neighbours")
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
