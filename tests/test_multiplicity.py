"""Claims corrected for how many were tested: the paired t-test's p, Holm's procedure against its step-down
definition, a study file's primary endpoint and family, the report's first lines, and committed reports written again
from their JSON with the correction (checked against p-values the test computes itself with scipy)."""

import json
import math

import numpy as np
import pytest
import run_study
from conftest import REPO, run_cli
from scipy import stats

from diffusers_flat.evaluation.measurements import Measurements
from diffusers_flat.studies.claims import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    PRIMARY,
    Claim,
    declared_claim,
    holm,
    paired_interval,
)
from diffusers_flat.studies.config import ClaimSpec, Study
from diffusers_flat.studies.report import claim_results, write_report


def holm_rejects(p: list[float], alpha: float) -> list[bool]:
    """Holm's procedure as its definition states it: walk the p-values up from the smallest, rejecting the k-th
    (1-based) while p_(k) <= alpha / (m - k + 1); stop at the first that is not."""
    m, rejected = len(p), [False] * len(p)
    for k, index in enumerate(sorted(range(m), key=lambda i: p[i]), start=1):
        if p[index] > alpha / (m - k + 1):
            break
        rejected[index] = True
    return rejected


def test_holm_adjusted_p_values_reject_exactly_what_the_step_down_procedure_rejects():
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a hypothesis that could not be tested stays in the family as p = 1
    assert holm([0.01, math.nan]) == pytest.approx([0.02, 1.0])
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.uniform(0, 0.1, rng.integers(1, 30)) ** rng.uniform(1, 3))
        adjusted = holm(p)
        assert all(a >= q for a, q in zip(adjusted, p)) and max(adjusted) <= 1
        for alpha in (0.01, 0.05, 0.1):
            assert [a <= alpha for a in adjusted] == holm_rejects(p, alpha)


def test_the_p_value_is_the_paired_t_tests():
    rng = np.random.default_rng(1)
    for n in (2, 3, 6, 10):
        a, b = rng.normal(0, 1, n), rng.normal(0.5, 1, n)
        interval = paired_interval(a, b)
        assert interval["p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
        # the 95% interval excludes zero exactly when p < 0.05
        assert (interval["low"] > 0 or interval["high"] < 0) == (interval["p"] < 0.05)
    assert math.isnan(paired_interval([1.0], [2.0])["p"])


def seeds_of(values: list[float]) -> dict[int, dict]:
    return {seed: {"x": value} for seed, value in enumerate(values, start=1)}


def test_a_family_is_corrected_together_and_the_primary_endpoint_alone():
    base = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    shifts = {"+A": [-0.50, -0.52, -0.49, -0.51, -0.50, -0.48], "+B": [-0.3, 0.0, -0.5, -0.2, -0.4, 0.0]}
    shifts["+C"] = [0.2, -0.3, 0.4, 0.1, -0.2, 0.3]
    results = {"ADM": seeds_of(base)} | {row: seeds_of(np.add(base, s)) for row, s in shifts.items()}
    measure = lambda r: r["x"]  # noqa: E731
    claims = [
        Claim("A lowers x", "ADM", "+A", measure, -1, "-", role=PRIMARY),
        *(Claim(f"{row} lowers x", "ADM", row, measure, -1, "-") for row in ("+A", "+B", "+C")),
        Claim("C lowers x, exploratory", "ADM", "+C", measure, -1, "-", role="exploratory"),
    ]
    primary, *family, exploratory = claim_results(results, claims)
    p = [stats.ttest_rel(np.add(base, shifts[row]), base).pvalue for row in ("+A", "+B", "+C")]
    # Holm by hand over the three secondaries
    order = np.argsort(p)
    expected, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p[i]))
        expected[i] = running
    assert [c["p_holm"] for c in family] == pytest.approx(expected)
    assert primary["p_holm"] is None and primary["p"] == pytest.approx(p[0]) and primary["verdict"] == HOLDS
    for c, adjusted in zip(family, expected):
        assert c["verdict"] == (HOLDS if adjusted <= 0.05 else INCONCLUSIVE)
    assert exploratory["p_holm"] is None and exploratory["role"] == "exploratory"
    # +B: p = 0.04 alone, significant, but not after the correction
    assert p[1] < 0.05 < expected[1] and family[1]["verdict"] == INCONCLUSIVE


def test_a_claim_against_its_direction_does_not_hold_only_when_its_adjusted_p_says_so():
    base = [1.0, 2.0, 3.0, 4.0]
    results = {"ADM": seeds_of(base), "+A": seeds_of(np.add(base, [1.0, 1.1, 0.9, 1.0]))}
    claims = [Claim("A lowers x", "ADM", "+A", lambda r: r["x"], -1, "-")]
    (c,) = claim_results(results, claims)
    assert c["p_holm"] == pytest.approx(stats.ttest_rel(np.add(base, [1.0, 1.1, 0.9, 1.0]), base).pvalue)
    assert c["verdict"] == DOES_NOT_HOLD


def test_the_papers_effect_keeps_its_direction_on_a_negative_base():
    results = {"ADM": seeds_of([-1.0, -2.0, -3.0]), "+A": seeds_of([-1.0, -2.0, -3.5])}
    claim = Claim("A shrinks the gap", "ADM", "+A", lambda r: r["x"], -1, "-", paper_relative=-0.71)
    (c,) = claim_results(results, [claim])
    assert c["paper_scaled"] == pytest.approx(-0.71 * 2.0)  # 71% of the base's size, in the claimed direction


def test_an_undefined_log_ratio_has_no_p_and_no_detectable_ratio(tmp_path):
    results = {"ADM": seeds_of([1.0, -2.0, 3.0]), "+A": seeds_of([0.5, 1.0, 1.5])}
    claims = [Claim("A lowers x", "ADM", "+A", lambda r: r["x"], -1, "-", log_ratio=True)]
    (c,) = claim_results(results, claims)
    assert c["verdict"].startswith("undefined") and math.isnan(c["p"]) and c["p_holm"] == 1.0


def kid_result(kid: float, increase: float, kept: float, moved: float, lpf: float) -> Measurements:
    """An evaluation with fp32 KID and one quantized level, as evaluate_flat.py writes it, read back."""
    level = {
        "bits": 4,
        "granularity": "per_channel",
        "kid": {"50": {"mean": kid + increase}},
        "fid": {"50": 0.0},
        "pixel_displacement": {"50": moved},
        "class_fidelity": {"50": {"kept": kept}},
    }
    written = {"kid": {"50": {"mean": kid}}, "lpf": {"lpf": lpf}, "quantization": {"levels": {"4:per_channel": level}}}
    return Measurements.from_json(written)


def test_declared_claims_read_their_measure_at_their_level():
    result = kid_result(kid=0.010, increase=0.030, kept=0.75, moved=12.0, lpf=0.05)
    value = {
        measure: declared_claim(measure, "ADM", "+SAM", None if measure == "lpf" else "4:per_channel").measure(result)
        for measure in ("kid_increase", "kid", "class_fidelity", "displacement", "lpf")
    }
    assert value == pytest.approx(
        {"kid_increase": 30.0, "kid": 40.0, "class_fidelity": 0.75, "displacement": 12.0, "lpf": 0.05}
    )
    assert declared_claim("kid", "ADM", "+SAM").measure(result) == pytest.approx(10.0)  # fp32
    assert declared_claim("kid_increase", "ADM", "+SAM", "4:per_channel").log_ratio
    assert declared_claim("class_fidelity", "ADM", "+SAM", "4:per_channel").expected_sign == 1


def test_a_study_file_expands_its_family_and_the_report_says_what_was_tested(tmp_path):
    path = tmp_path / "study.yaml"
    study = {
        "seeds": [1, 2, 3, 4],
        "methods": {"ADM": [], "SAM-a": [], "SAM-b": []},
        "variants": ["raw", "ema"],
        "evaluation": ["--quantize", "4:per_channel", "3:per_channel"],
        "primary": {
            "measure": "kid_increase",
            "base": "ADM",
            "treated": "SAM-a",
            "variant": "ema",
            "level": "4:per_channel",
        },
        "family": [
            {"measure": "kid_increase", "base": "ADM", "treated": "SAM-b", "variant": "ema", "level": "4:per_channel"},
            {
                "measure": "displacement",
                "base": "ADM",
                "treated": ["SAM-a", "SAM-b"],
                "variant": "ema",
                "level": "4:per_channel",
            },
            {"measure": "lpf", "base": "ADM", "treated": ["SAM-a", "SAM-b"], "variant": "raw"},
        ],
        "exploratory": [
            {"measure": "kid_increase", "base": "ADM", "treated": "SAM-a", "variant": "raw", "level": "4:per_channel"}
        ],
    }
    path.write_text(json.dumps(study))
    loaded = Study.load(path)
    assert loaded.primary == ClaimSpec("kid_increase", "ADM", "SAM-a", "ema", "4:per_channel")
    assert [(s.measure, s.treated) for s in loaded.family] == [
        ("kid_increase", "SAM-b"),
        ("displacement", "SAM-a"),
        ("displacement", "SAM-b"),
        ("lpf", "SAM-a"),
        ("lpf", "SAM-b"),
    ]
    rng = np.random.default_rng(2)
    damage = {"ADM": 40.0, "+SAM-a": 20.0, "+SAM-b": 38.0}
    results = {}
    for method in ("ADM", "SAM-a", "SAM-b"):
        for suffix in ("", "+EMA"):
            row = ("" if method == "ADM" else f"+{method}") + suffix or "ADM"
            scale = damage["ADM" if method == "ADM" else f"+{method}"]
            results[row] = {
                seed: kid_result(0.02, scale * rng.uniform(0.9, 1.1) / 1e3, 0.8, scale, 0.05 + rng.normal(0, 1e-3))
                for seed in loaded.seeds
            }
    settings = {"study": str(path), "evaluation": [], "variants": ["raw", "ema"], "primary": study["primary"]}
    settings |= {"family": [vars(s) for s in loaded.family], "exploratory": [vars(s) for s in loaded.exploratory]}
    markdown = write_report(results, settings, tmp_path / "report")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    roles = [c["role"] for c in data["claims"]]
    assert roles == ["primary"] + ["secondary"] * 5 + ["exploratory"]
    first_lines = markdown.split("\n\n")[2]
    assert first_lines.startswith("**Hypotheses tested: 6**") and "5 secondary claims" in first_lines
    primary = data["claims"][0]
    assert primary["verdict"] == HOLDS and "**Primary endpoint** (log ratio)" in markdown
    assert f"×{math.exp(-primary['interval']['detectable']):.3g}" in markdown  # the smallest effect it could detect
    p = [c["p"] for c in data["claims"][1:6]]
    assert [c["p_holm"] for c in data["claims"][1:6]] == pytest.approx(holm(p))


@pytest.mark.parametrize("name", ["fashion-mnist", "cheap-sam"])
def test_a_committed_report_is_written_again_from_its_json_with_the_correction(name, tmp_path, capsys):
    report = REPO / "docs" / f"study-{name}" / "report.json"
    recorded = json.loads(report.read_text())
    study = recorded["settings"]["study"]
    run_study.main(
        run_study.parse_args(["--study", study, "--output_dir", str(tmp_path), "--from_report", str(report)])
    )
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["results"] == recorded["results"]
    family = [c for c in data["claims"] if c["role"] == "secondary"]
    # every pre-registered claim is one family; the plain differences beside log ratios are not counted again
    assert len(family) == len(
        [c for c in recorded["claims"] if not (" has a smaller " in c["claim"] and c["form"] == "difference")]
    )
    # the p-values, recomputed here from the per-seed values the claims were made of
    for c in family:
        i = c["interval"]
        if i["n"] >= 2 and i["sd"] > 0 and not c["verdict"].startswith("undefined"):
            t = i["mean"] * math.sqrt(i["n"]) / i["sd"]
            assert c["p"] == pytest.approx(2 * stats.t.sf(abs(t), i["n"] - 1))
    assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p"] for c in family]))
    markdown = (tmp_path / "report.md").read_text()
    assert f"**Hypotheses tested: {len(family)}.**" in markdown
    assert "## The answer in one picture (picked after the results)" in markdown


def test_a_report_of_another_study_is_refused_in_one_line(tmp_path, capsys):
    report = REPO / "docs" / "study-fashion-mnist" / "report.json"
    argv = ["--study", "studies/digits.yaml", "--output_dir", tmp_path / "out", "--from_report", report]
    status, err = run_cli(run_study, argv, capsys)
    assert status != 0 and "--from_report" in err and "not of studies/digits.yaml" in err
    assert not (tmp_path / "out").exists()
