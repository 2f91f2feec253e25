"""The paper's claims as paired differences over seeds, with a 95% t-interval and a computed verdict (SPEC section 6).

Each claim compares two rows of the grid (e.g. +SAM against ADM) on one measurement, seed by seed: the same seed
means the same data order and noise, so the paired difference removes what the seeds share. A study tests many
claims: its file names one primary endpoint and a family of secondary claims, whose p-values are corrected together
by Holm's procedure (`holm`); a study file without them is one family of every claim it pre-registered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from scipy import stats

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.measurements import Level, Measurements

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
ALPHA = 0.05  # the level of every verdict: a claim holds when its (adjusted) p is at most this
# a claim's part in its study: tested alone at ALPHA, corrected within the family, or neither (reported as found);
# a companion is the plain difference shown beside a log-ratio claim, the same hypothesis on another scale
PRIMARY, SECONDARY, EXPLORATORY, COMPANION = "primary", "secondary", "exploratory", "companion"


class Interval(TypedDict):
    mean: float  # the mean paired difference, b - a
    low: float  # the interval's ends (nan with fewer than two pairs)
    high: float
    n: int
    confidence: float
    sd: float  # the standard deviation of the differences (nan with fewer than two pairs)
    detectable: float  # the smallest |effect| this design detects with 80% power (`detectable_effect`)
    p: float  # the two-sided paired t-test's p-value of a zero mean difference (nan with fewer than two pairs)


def detectable_effect(sd: float, n: int, confidence: float = 0.95, power: float = 0.8) -> float:
    """The minimum detectable effect of a paired design: the smallest true mean difference that a two-sided paired
    t-test at `confidence` finds (an interval excluding zero) with probability `power`, given n pairs whose
    differences have standard deviation `sd`:

        (t_{(1+c)/2, n-1} + t_{power, n-1}) sd / sqrt(n)

    (the t approximation to the noncentral-t power). An inconclusive verdict with an effect smaller than this says
    the design was blind to it; nan with fewer than two pairs.

    Example:
        >>> round(float(detectable_effect(sd=1.0, n=3)), 3)  # (4.303 + 1.061) / sqrt(3)
        3.097
    """
    if n < 2:
        return math.nan
    return (stats.t.ppf((1 + confidence) / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of the paired differences b_i - a_i and its t-interval: mean +- t_{(1+c)/2, n-1} s / sqrt(n), with the
    two-sided p-value of the paired t-test, 2 P(T_{n-1} > |mean| sqrt(n) / s) (the interval excludes zero exactly when
    p < 1 - c).

    Example:
        >>> paired_interval([1.0, 2.0, 3.0], [2.0, 2.5, 4.5])["mean"]
        1.0
    """
    if len(a) != len(b):
        raise FlatError(f"b: {len(b)} values do not pair with a's {len(a)}", "b")
    differences = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(differences)
    mean = float(differences.mean()) if n else math.nan
    if n < 2:
        nan = math.nan
        interval = {"mean": mean, "low": nan, "high": nan, "n": n, "confidence": confidence}
        return {**interval, "sd": nan, "detectable": nan, "p": nan}
    sd = float(differences.std(ddof=1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    detectable = detectable_effect(sd, n, confidence)
    if sd > 0:
        p = float(2 * stats.t.sf(abs(mean) * math.sqrt(n) / sd, n - 1))
    else:  # every difference the same: certain unless it is zero
        p = 1.0 if mean == 0 else 0.0
    interval = {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "confidence": confidence}
    return {**interval, "sd": sd, "detectable": detectable, "p": p}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of m hypotheses: with the p-values sorted p_(1) <= ... <= p_(m),
    the k-th adjusted one is max_{j <= k} min(1, (m - j + 1) p_(j)), returned in the input's order. A hypothesis is
    rejected at level alpha when its adjusted p is at most alpha, which controls the chance of any false claim in the
    family at alpha. A p-value that is nan (a claim that could not be tested) counts as 1: it stays in m.

    Example:
        >>> [round(p, 4) for p in holm([0.01, 0.04, 0.03])]  # 3 x 0.01; 2 x 0.03; max(0.06, 1 x 0.04)
        [0.03, 0.06, 0.06]
    """
    p = [1.0 if math.isnan(value) else float(value) for value in p_values]
    m, adjusted, running = len(p), [0.0] * len(p), 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


class Fraction(TypedDict):
    estimate: float  # mean(base - mode) / mean(base - full)
    low: float  # Fieller's interval; -inf and inf when it is unbounded
    high: float
    n: int
    confidence: float


def fraction_kept(
    base: Sequence[float], full: Sequence[float], mode: Sequence[float], confidence: float = 0.95
) -> Fraction:
    """The fraction of a method's effect that a cheaper one keeps, paired over seeds: f = mean(base - mode) /
    mean(base - full) (1: all of full's effect, 0: none), with Fieller's interval for a ratio of paired means: every
    f whose numerator - f denominator is within the t-interval of zero,

        (a - f b)^2 <= t^2 (v_aa - 2 f v_ab + f^2 v_bb),    a, b the means, v the (co)variances of the means.

    The interval is unbounded (-inf, inf) when full's own effect b is not distinct from zero at this confidence:
    there is then no effect to keep a fraction of.

    Example:
        >>> kept = fraction_kept([1.0, 1.2, 0.9], [0.5, 0.7, 0.4], [0.6, 0.8, 0.5])  # full -0.5 each, mode -0.4
        >>> tuple(round(float(kept[key]), 3) for key in ("estimate", "low", "high"))
        (0.8, 0.8, 0.8)
    """
    numerator = np.asarray(base, dtype=float) - np.asarray(mode, dtype=float)
    denominator = np.asarray(base, dtype=float) - np.asarray(full, dtype=float)
    if not len(numerator) == len(denominator) == len(base):
        raise FlatError(f"full and mode must pair with base's {len(base)} values", "mode")
    n = len(numerator)
    a, b = float(numerator.mean()), float(denominator.mean())
    estimate = a / b if b else math.nan
    if n < 2:
        return {"estimate": estimate, "low": -math.inf, "high": math.inf, "n": n, "confidence": confidence}
    (v_aa, v_ab), (_, v_bb) = (np.cov(numerator, denominator, ddof=1) / n).tolist()
    q = stats.t.ppf((1 + confidence) / 2, n - 1) ** 2
    # the quadratic A f^2 - 2 B f + C <= 0; bounded only when b^2 > q v_bb (b distinct from zero)
    A, B, C = b * b - q * v_bb, a * b - q * v_ab, a * a - q * v_aa
    if A <= 0:
        return {"estimate": estimate, "low": -math.inf, "high": math.inf, "n": n, "confidence": confidence}
    root = math.sqrt(max(B * B - A * C, 0.0))  # >= 0: the estimate a / b always satisfies the inequality
    return {"estimate": estimate, "low": (B - root) / A, "high": (B + root) / A, "n": n, "confidence": confidence}


def detectable_cell(interval: Interval) -> str:
    """The detectable effect as a report shows it: ±value, or "-" without an interval."""
    detectable = interval.get("detectable", math.nan)
    return "-" if math.isnan(detectable) else f"±{detectable:.4g}"


def verdict(interval: Interval, expected_sign: int, p: float | None = None) -> str:
    """ "holds" when the interval excludes zero on the side of `expected_sign` (-1: the claim says b < a), "does not
    hold" when it excludes zero on the other side, else "inconclusive" (also with fewer than two pairs). With `p` (a
    family's adjusted p-value), the same read from p <= ALPHA and the sign of the mean instead of the interval."""
    low, high = interval["low"], interval["high"]
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if p is not None:
        if p > ALPHA:
            return INCONCLUSIVE
        return HOLDS if interval["mean"] * expected_sign > 0 else DOES_NOT_HOLD
    if (expected_sign < 0 and high < 0) or (expected_sign > 0 and low > 0):
        return HOLDS
    if (expected_sign < 0 and low > 0) or (expected_sign > 0 and high < 0):
        return DOES_NOT_HOLD
    return INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims: `measure` of row `treated` against row `base`, expected to move by
    `expected_sign` (-1: lower). With `log_ratio`, the paired test is on log(treated / base) (damage measures vary
    multiplicatively between seeds, SPEC section 6); `paper_relative` is the paper's effect as a fraction of the
    base's value (e.g. -0.35: LPF 0.097 -> 0.063), which the report scales to this study's units."""

    statement: str
    base: str
    treated: str
    measure: Callable[[Measurements], float]
    expected_sign: int
    paper: str
    log_ratio: bool = False
    paper_relative: float | None = None
    role: str = SECONDARY  # PRIMARY, SECONDARY (the Holm family), EXPLORATORY or COMPANION
    ladder: tuple[str, str] | None = None  # a ladder cell (level, what): ("3-bit per_channel", "fixed-loss increase")


def lpf(result: Measurements) -> float:
    """The raw LPF, the paper's Table 3 number."""
    return result.lpf["lpf"]


def sharpness_excess(result: Measurements) -> float:
    """LPF - L(w): what LPF adds to the model's own loss, which a model that merely underfits cannot lower."""
    return result.lpf["lpf"] - result.loss


def perturbation_slope(result: Measurements) -> float:
    """The least-squares slope of the loss-under-perturbation curve against gamma."""
    return float(np.polyfit(result.perturbation["gamma"], result.perturbation["loss"], 1)[0])


def exposure_gap(result: Measurements) -> float:
    """The exposure-bias gap of the squared noise norm, the paper's Table 1 number."""
    return result.exposure_bias["squared_norm_gap"]


def _quantization_increase(measure: str, bits: int) -> Callable[[Measurements], float]:
    """What b-bit weights add to FID or KID at T'=20 (same sampling noise), or to the fixed diffusion loss."""

    def increase(result: Measurements) -> float:
        level = result.by_bits()[bits]
        if measure == "loss":
            return level.loss_increase
        if measure == "fid":
            return level.fid[20] - result.fid[20]
        return level.kid[20]["mean"] - result.kid[20]["mean"]

    return increase


def _quantization_claims(bits: int, paper: str) -> tuple[Claim, ...]:
    """Claim 4 at b bits, three ways: FID (the paper's), KID, and the fixed diffusion loss."""
    return tuple(
        Claim(f"SAM loses less {what} under {bits}-bit weights", "ADM", "+SAM", _quantization_increase(m, bits), -1, p)
        for what, m, p in (
            ("FID (T'=20)", "fid", paper),
            ("KID (T'=20)", "kid", "(not reported)"),
            ("fixed diffusion loss", "loss", "(not reported)"),
        )
    )


# SPEC section 6, one claim per measurement; EMA/SWA's "do not lower LPF" is tested in the paper's direction (up).
CLAIMS = (
    Claim("SAM lowers LPF relative to ADM", "ADM", "+SAM", lpf, -1, "0.097 -> 0.063"),
    Claim("SAM lowers the sharpness excess LPF - L(w)", "ADM", "+SAM", sharpness_excess, -1, "(not reported)"),
    Claim("SAM lowers the slope of the loss under perturbation", "ADM", "+SAM", perturbation_slope, -1, "(Fig. 5)"),
    Claim("EMA does not lower LPF relative to ADM", "ADM", "+EMA", lpf, 1, "0.097 -> 0.099"),
    Claim("SWA does not lower LPF relative to ADM", "ADM", "+SWA", lpf, 1, "0.097 -> 0.099"),
    Claim("SAM shrinks the exposure-bias gap relative to ADM", "ADM", "+SAM", exposure_gap, -1, "+11.39 -> +3.32"),
    *_quantization_claims(8, "+13.65 vs -0.07"),
    # 8 bits moves neither model at the digits' scale: the same claim where quantization bites
    *_quantization_claims(6, "(not reported)"),
    *_quantization_claims(4, "(not reported)"),
    Claim("SAM improves FID at T'=20 over ADM", "ADM", "+SAM", lambda r: r.fid[20], -1, "34.47 -> 9.01"),
    Claim("SAM improves KID at T'=20 over ADM", "ADM", "+SAM", lambda r: r.kid[20]["mean"], -1, "(not reported)"),
)


def ladder_point(granularity: str, bits: int, name: str) -> Callable[[Measurements], float]:
    """One measure of the quantization-sensitivity curve at one level."""
    return lambda result: result.sensitivity.curves[granularity][bits][name]


LADDER_MEASURES = {"loss_increase": "fixed-loss increase", "ddim_displacement": "DDIM pixel displacement"}


def comparison_claims(
    base: str,
    treated: str,
    fid_steps: Sequence[int] = (),
    quantized_bits: Sequence[int] = (),
    ladder: dict[str, Sequence[int]] | None = None,
) -> list[Claim]:
    """The pre-registered claims of one comparison of a study whose rows are not the paper's grid (e.g. SAM at two
    rho against ADM): flatness, quality at each FID column, KID/FID under the named quantization levels, the
    exposure-bias gap, and at each ladder level (granularity -> bits) the fixed-loss increase and the DDIM
    displacement, each as a log ratio with the plain difference beside.

    Example:
        >>> [c.statement for c in comparison_claims("ADM", "+SAM-rho0.01")][:2]
        ['+SAM-rho0.01 lowers LPF relative to ADM', '+SAM-rho0.01 lowers the sharpness excess LPF - L(w)']
    """
    t = treated
    claims = [
        Claim(f"{t} lowers LPF relative to {base}", base, t, lpf, -1, "0.097 -> 0.063", paper_relative=-0.35),
        Claim(f"{t} lowers the sharpness excess LPF - L(w)", base, t, sharpness_excess, -1, "(not reported)"),
    ]
    for steps in fid_steps:
        kid = lambda r, s=steps: r.kid[s]["mean"]  # noqa: E731
        claims.append(Claim(f"{t} improves KID at T'={steps}", base, t, kid, -1, "(not reported)"))
        paper, relative = ("34.47 -> 9.01", -0.74) if steps == 20 else ("(other T')", None)
        fid = lambda r, s=steps: r.fid[s]  # noqa: E731
        claims.append(Claim(f"{t} improves FID at T'={steps}", base, t, fid, -1, paper, paper_relative=relative))
    for bits in quantized_bits:
        for what, m in (("KID", "kid"), ("FID", "fid")):
            paper, relative = ("+13.65 vs -0.07", -1.0) if (bits, m) == (8, "fid") else ("(not reported)", None)
            increase = _quantization_increase(m, bits)
            statement = f"{t} loses less {what} (T'=20) under {bits}-bit weights"
            claims.append(Claim(statement, base, t, increase, -1, paper, paper_relative=relative))
    claims.append(
        Claim(f"{t} shrinks the exposure-bias gap", base, t, exposure_gap, -1, "+11.39 -> +3.32", paper_relative=-0.71)
    )
    for granularity, levels in (ladder or {}).items():
        for bits in levels:
            for name, what in LADDER_MEASURES.items():
                measure = ladder_point(granularity, bits, name)
                cell = (f"{bits}-bit {granularity}", what)
                statement = f"{t} has a smaller {what} at {cell[0]}"
                claims.append(Claim(statement, base, t, measure, -1, "(not reported)", log_ratio=True, ladder=cell))
                claims.append(Claim(statement, base, t, measure, -1, "(not reported)", role=COMPANION, ladder=cell))
    return claims


@dataclass(frozen=True)
class Measure:
    """A measurement a study file's declared claims name (`MEASURES`): its words in a claim, its value in one
    evaluation's measurements at a quantized level (None: fp32) and T' (None: the result's first), the
    direction a flat model is expected to move it, and whether it is tested as a log ratio (damage varies
    multiplicatively between seeds)."""

    words: str  # "{treated} <words> than {base}"; {level} is where it is measured
    value: Callable[[Measurements, Level | None, int | None], float]
    expected_sign: int
    log_ratio: bool
    level: str  # "required", "optional" (None: fp32) or "none"


def _kid(result: Measurements, level: Level | None, steps: int | None) -> float:
    measured = result.at(level) if level else result
    return 1e3 * measured.kid[steps or result.first_steps]["mean"]


def _at_level(name: str, field: str | None = None) -> Callable[[Measurements, Level | None, int | None], float]:
    """A per-T' measure of a quantized level, e.g. its pixel displacement (or a field of it, e.g. class fidelity's
    "kept")."""

    def value(result: Measurements, level: Level | None, steps: int | None) -> float:
        measured = getattr(result.at(level), name)[steps or result.first_steps]
        return measured[field] if field else measured

    return value


MEASURES = {
    "kid_increase": Measure(
        "loses less KID x10³ from fp32 to {level}",
        lambda r, q, t: _kid(r, q, t) - _kid(r, None, t),
        -1,
        True,
        "required",
    ),
    "kid": Measure("has a lower KID x10³ {level}", _kid, -1, False, "optional"),
    "class_fidelity": Measure(
        "keeps the class of more samples at {level}", _at_level("class_fidelity", "kept"), 1, False, "required"
    ),
    "displacement": Measure(
        "moves its samples less at {level} (pipeline sampler)", _at_level("pixel_displacement"), -1, True, "required"
    ),
    "lpf": Measure("has a lower LPF", lambda r, q, t: lpf(r), -1, False, "none"),
}


def declared_claim(
    measure: str, base: str, treated: str, level: str | None = None, steps: int | None = None, role: str = SECONDARY
) -> Claim:
    """A claim a study file declares: `MEASURES[measure]` of row `treated` against row `base` at `level`
    ("B:granularity"; None: fp32) and T' `steps` (None: the result's first T').

    Example:
        >>> claim = declared_claim("kid_increase", "+EMA", "+SAM-rho0.01+EMA", "4:per_channel", role=PRIMARY)
        >>> claim.statement, claim.log_ratio
        ('+SAM-rho0.01+EMA loses less KID x10³ from fp32 to 4-bit per channel than +EMA', True)
    """
    m, at = MEASURES[measure], None if level is None else Level.parse(level)
    if m.level == "none":
        where = ""
    elif m.level == "required":
        where = at.words
    else:  # optional: a level, or fp32
        where = f"at {at.words}" if at else "at fp32"
    statement = f"{treated} {m.words.format(level=where)} than {base}"
    value = lambda result: m.value(result, at, steps)  # noqa: E731
    return Claim(statement, base, treated, value, m.expected_sign, "(not reported)", log_ratio=m.log_ratio, role=role)
