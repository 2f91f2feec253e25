"""One model's evaluation read back typed, for the reports that compare many: T' and bits are ints, a quantized level
is a `Level`, a metric that was not measured is None (or an empty mapping). `eval_results.json` itself is unchanged
(`EvaluationResult`, JSON's string keys); `Measurements.from_json` is where the studies' reports read it, and it
keeps the result as written (`json`) for the report.json that stores it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diffusers_flat.evaluation.levels import quantization_levels

if TYPE_CHECKING:  # the metrics' result types only: reading results needs no torch
    from diffusers_flat.evaluation.registry import EvaluationResult
    from diffusers_flat.metrics.class_fidelity import ClassFidelity
    from diffusers_flat.metrics.exposure_bias import ExposureBiasResult
    from diffusers_flat.metrics.fid import KIDResult
    from diffusers_flat.metrics.flatness import LPFResult, PerturbationCurve
    from diffusers_flat.metrics.memorization import MemorizationResult
    from diffusers_flat.metrics.pfd import PFDResult
    from diffusers_flat.metrics.quantization_sensitivity import SensitivityPoint


@dataclass(frozen=True)
class Level:
    """A quantized level: `bits` and the scales' `granularity` ("per_tensor" or "per_channel").

    Example:
        >>> level = Level.parse("4:per_channel")
        >>> level.bits, str(level), level.words
        (4, '4:per_channel', '4-bit per channel')
    """

    bits: int
    granularity: str

    @classmethod
    def parse(cls, level: str) -> Level:
        """A level from its "B:granularity" form."""
        bits, granularity = level.split(":")
        return cls(int(bits), granularity)

    def __str__(self) -> str:
        return f"{self.bits}:{self.granularity}"

    @property
    def words(self) -> str:
        """ "4-bit per channel"."""
        return f"{self.bits}-bit {self.granularity.replace('_', ' ')}"


# what a measure of `Measurements` raises where they lack it: a metric not asked for (None), a T' or level not run
NOT_MEASURED = (KeyError, TypeError, AttributeError)


def _by_int(values: dict | None) -> dict:
    return {int(k): v for k, v in (values or {}).items()}


@dataclass(frozen=True)
class QuantizedMeasurements:
    """A quantized level's measures, paired with the fp32 model (same noises, same loss triples), by T'."""

    level: Level
    fid: dict[int, float] = field(default_factory=dict)
    kid: dict[int, KIDResult] = field(default_factory=dict)
    pixel_displacement: dict[int, float] = field(default_factory=dict)
    class_fidelity: dict[int, ClassFidelity] = field(default_factory=dict)
    loss_increase: float | None = None


@dataclass(frozen=True)
class Sensitivity:
    """The quantization ladder: granularity -> bits -> the measures at that level."""

    curves: dict[str, dict[int, SensitivityPoint]]
    num_samples: int
    steps: int


@dataclass(frozen=True)
class Measurements:
    """What one model's evaluation measured (`EvaluationResult`), typed.

    Args:
        fid: T' -> FID.
        kid: T' -> KID.
        fid_num_generated: the generated images behind FID and KID.
        fid_num_real: the real images behind them.
        loss: the fixed diffusion loss L(w).
        lpf: the LPF estimate.
        perturbation: the loss under random perturbations of growing size.
        exposure_bias: the exposure-bias curves and gaps.
        memorization: the memorization ratio.
        pfd: PFD against the evaluation's reference (E_mem in a generalization study).
        pfd_teacher: PFD against the teacher (E_gen), where a study measured it.
        sensitivity: the quantization ladder.
        quantization: each quantized level's measures.
        flatness_series: LPF of the trained weights by step (`--flatness_every`), where a study read it.
        temperature: the empirical denoiser's temperature, for its evaluations.
        noise_unconditional: whether that denoiser ignores the noise level.
        json: the result as written, which reports store again.

    Example:
        >>> m = Measurements.from_json({"kid": {"20": {"mean": 0.01}}, "quantization": {"levels": {"4:per_channel": {
        ...     "bits": 4, "granularity": "per_channel", "kid": {"20": {"mean": 0.03}}}}}})
        >>> m.first_steps, m.kid[20]["mean"], m.at(Level(4, "per_channel")).kid[20]["mean"]
        (20, 0.01, 0.03)
    """

    fid: dict[int, float] = field(default_factory=dict)
    kid: dict[int, KIDResult] = field(default_factory=dict)
    fid_num_generated: int | None = None
    fid_num_real: int | None = None
    loss: float | None = None
    lpf: LPFResult | None = None
    perturbation: PerturbationCurve | None = None
    exposure_bias: ExposureBiasResult | None = None
    memorization: MemorizationResult | None = None
    pfd: PFDResult | None = None
    pfd_teacher: PFDResult | None = None
    sensitivity: Sensitivity | None = None
    quantization: dict[Level, QuantizedMeasurements] = field(default_factory=dict)
    flatness_series: list[dict] | None = None
    temperature: float | None = None
    noise_unconditional: bool | None = None
    json: EvaluationResult = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, result: EvaluationResult | dict) -> Measurements:
        """Read one model's entry of `eval_results.json` (also results written before quantized levels had a
        granularity each)."""
        levels = {}
        for name, level in quantization_levels(result).items():
            at = Level.parse(name)
            levels[at] = QuantizedMeasurements(
                at,
                _by_int(level.get("fid")),
                _by_int(level.get("kid")),
                _by_int(level.get("pixel_displacement")),
                _by_int(level.get("class_fidelity")),
                level.get("loss_increase"),
            )
        sensitivity = result.get("sensitivity")
        if sensitivity is not None:
            curves = {g: _by_int(by_bits) for g, by_bits in sensitivity["curves"].items()}
            sensitivity = Sensitivity(curves, sensitivity["num_samples"], sensitivity["steps"])
        return cls(
            _by_int(result.get("fid")),
            _by_int(result.get("kid")),
            result.get("fid_num_generated"),
            result.get("fid_num_real"),
            result.get("loss"),
            result.get("lpf"),
            result.get("perturbation"),
            result.get("exposure_bias"),
            result.get("memorization"),
            result.get("pfd"),
            result.get("pfd_teacher"),
            sensitivity,
            levels,
            result.get("flatness_series"),
            result.get("temperature"),
            result.get("noise_unconditional"),
            result,
        )

    @property
    def first_steps(self) -> int | None:
        """The smallest T' with a KID (a study's first column); None without KID."""
        return min(self.kid, default=None)

    def at(self, level: Level) -> QuantizedMeasurements:
        """The measures at `level` (KeyError: not measured there)."""
        return self.quantization[level]

    def by_bits(self) -> dict[int, QuantizedMeasurements]:
        """The quantized levels by bits, for results whose levels share one granularity (a study's, whose claims
        name the bits); several granularities raise."""
        if len({level.granularity for level in self.quantization}) > 1:
            granularities = sorted({level.granularity for level in self.quantization})
            raise ValueError(f"these results mix granularities ({', '.join(granularities)}): name the level")
        return {level.bits: measured for level, measured in self.quantization.items()}


# row -> seed -> that row's pipeline's measurements at that seed: what a study's report compares
Results = dict[str, dict[int, Measurements]]


def read_results(results: dict[str, dict]) -> Results:
    """Type a study's results as report.json stores them (row -> seed -> `EvaluationResult`); seeds become ints."""
    return {row: {int(seed): Measurements.from_json(r) for seed, r in seeds.items()} for row, seeds in results.items()}


def json_results(results: Results) -> dict[str, dict[int, EvaluationResult]]:
    """The results as report.json stores them."""
    return {row: {seed: m.json for seed, m in seeds.items()} for row, seeds in results.items()}
