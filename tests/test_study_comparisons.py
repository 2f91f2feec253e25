"""A study whose rows are not the paper's grid (SAM at two rho against ADM): the pre-registered claims of each
comparison, log-ratio tests against a hand computation, the paper's effect in our units, the report's ladder
sections and quality-rule pick, and a micro study on a few hundred Fashion-MNIST images end to end (with flatness
logged during training, a declared primary endpoint and family, a variant's own evaluation and the picture the
study file names)."""

import json
import math
import shutil

import numpy as np
import pytest
import run_study
from conftest import use_pooled_inception
from helpers import write_study
from scipy import stats

from diffusers_flat.data.fashion_mnist import local_files
from diffusers_flat.evaluation.measurements import Measurements
from diffusers_flat.studies.claims import HOLDS, Claim, fraction_kept, lpf
from diffusers_flat.studies.report import claim_results, fractions_kept, study_claims, write_report

LEVELS = {"per_tensor": ("8", "4"), "per_channel": ("8", "4")}


def result(kid: float, loss_increase: float, moved: float, lpf_value: float = 0.05) -> Measurements:
    """A pipeline's evaluation with every measure the report reads, read back; the ladder scales with the given
    damage."""
    curves = {
        g: {
            b: {"loss_increase": loss_increase * (9 - int(b)), "ddim_displacement": moved * (9 - int(b))} for b in bits
        }
        for g, bits in LEVELS.items()
    }
    curves["per_tensor"]["8"]["ancestral_displacement"] = 1.0
    written = {
        "fid": {"20": 1000 * kid},
        "kid": {"20": {"mean": kid}},
        "loss": 0.04,
        "lpf": {"lpf": lpf_value},
        "exposure_bias": {"squared_norm_gap": 1.0, "gap": [0.1, 0.2], "timesteps": [999, 0]},
        "quantization": {  # as results were written before each level had its granularity
            "granularity": "per_tensor",
            "fid": {"5": {"20": 1000 * kid + 5}},
            "kid": {"5": {"20": {"mean": kid + 0.005}}},
            "loss_increase": {"5": loss_increase},
            "pixel_displacement": {"5": {"20": moved}},
        },
        "sensitivity": {"curves": curves, "num_samples": 4, "steps": 2},
    }
    return Measurements.from_json(written)


def test_a_log_ratio_claim_is_the_t_interval_of_the_log_ratios():
    base, treated = [2.0, 4.0, 8.0, 5.0], [1.0, 3.0, 4.0, 2.0]
    results = {
        "ADM": {s: {"x": b} for s, b in enumerate(base)},
        "+SAM": {s: {"x": t} for s, t in enumerate(treated)},
    }
    claims = [
        Claim("ratio", "ADM", "+SAM", lambda r: r["x"], -1, "-", log_ratio=True),
        Claim("difference", "ADM", "+SAM", lambda r: r["x"], -1, "-"),
    ]
    ratio, difference = claim_results(results, claims)
    logs = [math.log(t / b) for b, t in zip(base, treated)]
    mean, sd = sum(logs) / 4, float(np.std(logs, ddof=1))
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert ratio["form"] == "log ratio" and ratio["interval"]["mean"] == pytest.approx(mean)
    assert (ratio["interval"]["low"], ratio["interval"]["high"]) == pytest.approx((mean - half, mean + half))
    assert ratio["verdict"] == HOLDS  # every ratio is below 1: the interval of the logs is below 0
    assert difference["interval"]["mean"] == pytest.approx(np.mean(np.subtract(treated, base)))
    # A damage that quantization lowered (a negative loss increase) has no log: the ratio form says so.
    results["ADM"][0]["x"] = -0.1
    assert claim_results(results, claims)[0]["verdict"] == "undefined (a value <= 0)"


def test_the_papers_effect_is_scaled_to_the_base_rows_mean():
    lpfs = {"ADM": (0.10, 0.14), "+SAM": (0.08, 0.10)}
    results = {
        row: {seed: Measurements.from_json({"lpf": {"lpf": value}}) for seed, value in enumerate(values, 1)}
        for row, values in lpfs.items()
    }
    claim = Claim("SAM lowers LPF", "ADM", "+SAM", lpf, -1, "0.097 -> 0.063", paper_relative=-0.35)
    (c,) = claim_results(results, [claim])
    assert c["paper_scaled"] == pytest.approx(-0.35 * 0.12)


def test_the_fraction_kept_is_the_set_of_ratios_a_paired_t_test_does_not_reject():
    # Fieller's interval by its definition: every f for which the t-test of (base - mode) - f (base - full) keeps zero,
    # found here by scanning f on a fine grid
    rng = np.random.default_rng(1)
    base = 0.10 + 0.01 * rng.standard_normal(5)
    full, mode = base - 0.05 + 0.004 * rng.standard_normal(5), base - 0.03 + 0.006 * rng.standard_normal(5)
    kept = fraction_kept(base, full, mode)
    t = stats.t.ppf(0.975, 4)
    grid = np.linspace(-1.0, 3.0, 400_001)
    d_mode, d_full = base - mode, base - full
    differences = d_mode[None, :] - grid[:, None] * d_full[None, :]
    accepted = grid[np.abs(differences.mean(1)) <= t * differences.std(1, ddof=1) / math.sqrt(5)]
    assert kept["estimate"] == pytest.approx(d_mode.mean() / d_full.mean())
    assert (kept["low"], kept["high"]) == pytest.approx((accepted.min(), accepted.max()), abs=2e-5)
    assert 0.2 < kept["low"] < kept["estimate"] < kept["high"] < 1.2  # a bounded interval around about 0.6
    # full's differences all equal: the interval is the t-interval of base - mode divided by that effect
    constant = fraction_kept(base, base - 0.05, mode)
    half = t * d_mode.std(ddof=1) / math.sqrt(5)
    assert (constant["low"], constant["high"]) == pytest.approx(
        ((d_mode.mean() - half) / 0.05, (d_mode.mean() + half) / 0.05)
    )


def test_the_fraction_of_an_effect_that_is_not_there_is_unbounded():
    rng = np.random.default_rng(2)
    base = 0.10 + 0.01 * rng.standard_normal(5)
    full = base + 0.01 * rng.standard_normal(5)  # full's own effect: noise around zero
    kept = fraction_kept(base, full, base - 0.02)
    assert stats.ttest_1samp(base - full, 0.0).pvalue > 0.05  # not distinct from zero, as constructed
    assert (kept["low"], kept["high"]) == (-math.inf, math.inf)


def test_the_report_says_which_method_keeps_80_percent_of_the_effect(tmp_path):
    # full SAM halves LPF and the 4-bit damage; "keep" keeps 90% of both and "lose" 20%, seed by seed with noise
    rng = np.random.default_rng(3)
    results = {"ADM": {}, "+SAM": {}, "+SAM-keep": {}, "+SAM-lose": {}}
    for seed in range(1, 7):
        lpf_adm, damage = 0.08 * rng.uniform(0.95, 1.05), rng.uniform(0.9, 1.1)
        for row, kept in (("ADM", 0.0), ("+SAM", 1.0), ("+SAM-keep", 0.9), ("+SAM-lose", 0.2)):
            noise = 1 + 0.003 * rng.standard_normal()
            # LPF: ADM - kept x 0.04; damage: ADM x 0.5^kept (a log-scale fraction)
            results[row][seed] = result(
                0.02, 1e-3 * damage * 0.5**kept * noise, 10 * damage * 0.5**kept, lpf_adm - 0.04 * kept * noise
            )
    fraction = {"of": "SAM", "methods": ["SAM-keep", "SAM-lose"], "granularity": "per_channel", "bits": 4}
    rows = fractions_kept(results, fraction, ["raw"])
    assert [(r["row"], r["goal"]) for r in rows] == [("+SAM-keep", "yes"), ("+SAM-lose", "no")]
    for r, expected in zip(rows, (0.9, 0.2)):
        assert {name: round(k["estimate"], 1) for name, k in r["kept"].items()} == {
            "LPF": expected,
            "fixed-loss increase, 4-bit per_channel": expected,
            "DDIM displacement, 4-bit per_channel": expected,
        }
    settings = {"study": "s.yaml", "evaluation": [], "variants": ["raw"], "fraction_kept": fraction}
    settings["comparisons"] = [("ADM", row) for row in results if row != "ADM"]
    markdown = write_report(results, settings, tmp_path)
    assert "## Fraction of the effect kept" in markdown and "| +SAM-keep | +SAM | 0.90 [" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["fractions"][1]["goal"] == "no"


def comparison_results() -> dict:
    """Six seeds of ADM and SAM at two rho: rho 0.01 halves the damage and costs quality, rho 0.001 keeps both."""
    rng = np.random.default_rng(0)
    rows = {"ADM": (0.020, 1.0), "+SAM-rho0.01": (0.030, 0.5), "+SAM-rho0.001": (0.019, 0.98)}
    return {
        row: {
            seed: result(kid * (1 + 0.05 * rng.standard_normal()), 1e-3 * damage, 10 * damage * rng.uniform(0.9, 1.1))
            for seed in range(1, 7)
        }
        for row, (kid, damage) in rows.items()
    }


def test_a_comparison_study_reports_its_claims_ladder_and_pick(tmp_path):
    results = comparison_results()
    comparisons = [("ADM", "+SAM-rho0.01"), ("ADM", "+SAM-rho0.001")]
    settings = {"study": "s.yaml", "evaluation": [], "comparisons": comparisons}
    claims = study_claims(results, settings)
    # per comparison: LPF, the sharpness excess, KID and FID at T'=20, KID and FID at 5 bits, the exposure gap, and
    # 4 ladder levels x 2 measures x (log ratio, difference)
    assert len(claims) == 2 * (7 + 4 * 2 * 2)
    markdown = write_report(results, settings, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    ladder = [c for c in data["claims"] if c["rows"] == "+SAM-rho0.01 vs ADM" and c["form"] == "log ratio"]
    assert {c["verdict"] for c in ladder} == {HOLDS}  # half the damage at every level, seed by seed
    # the ladder's cells are known by their kind, never by their words: 4 levels x 2 measures x 2 forms x 2 rows
    cells = {(c["rows"], c["ladder"]["level"], c["ladder"]["what"]) for c in data["claims"] if c["ladder"]}
    assert len([c for c in data["claims"] if c["ladder"]]) == 32 and len(cells) == 16
    assert ("+SAM-rho0.01 vs ADM", "4-bit per_channel", "fixed-loss increase") in cells
    kid = {t: np.mean([r.kid[20]["mean"] for r in results[t].values()]) for _, t in comparisons}
    assert f"it picks **{min(kid, key=kid.get)}**" in markdown
    for section in (
        "## Quantization-sensitivity curves",
        "### Ladder claims: +SAM-rho0.001 vs ADM",
        "4-bit per_channel",
    ):
        assert section in markdown
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(
    local_files("train") is None or local_files("test") is None,
    reason="needs Debian's dataset-fashion-mnist (the README's test command installs it)",
)
def test_a_micro_study_on_fashion_mnist_runs_end_to_end(tmp_path, monkeypatch):
    training = json.loads(write_study(tmp_path / "base.yaml").read_text())["training"]
    training += ["--dataset_name", "fashion_mnist", "--train_subset", "300", "--ema_max_decay", "0.9"]
    training += ["--flatness_every", "1", "--flatness_draws", "2", "--flatness_samples", "4"]
    evaluation = ["--metrics", "fid", "lpf", "exposure_bias", "sensitivity", "--inference_steps", "2"]
    evaluation += ["--num_samples", "100", "--num_real", "100", "--quantize", "5", "--lpf_draws", "2"]
    evaluation += ["--loss_samples", "8", "--exposure_samples", "2", "--ladder", "8", "3", "--ladder_samples", "2"]
    evaluation += ["--ladder_steps", "2"]
    methods = {"ADM": [], "SAM-rho0.01": ["--sam_rho", "0.01"]}
    ema_evaluation = ["--metrics", "fid", "--inference_steps", "2", "--num_samples", "100", "--num_real", "100"]
    ema_evaluation += ["--quantize", "4:per_channel"]
    rows = {"base": "ADM", "treated": "SAM-rho0.01"}
    path = write_study(
        tmp_path / "study.yaml",
        seeds=[1],
        methods=methods,
        variants=["raw", "ema"],
        training=training,
        evaluation=evaluation,
        variant_evaluation={"ema": ema_evaluation},
        primary={"measure": "kid_increase", **rows, "variant": "ema", "level": "4:per_channel"},
        family=[{"measure": "lpf", **rows, "variant": "raw"}, {"measure": "kid", **rows, "variant": "ema"}],
        figure={"rows": ["ADM", "SAM-rho0.01"], "variant": "ema", "level": "3:per_channel", "seeds": [1]}
        | {"noises": 4, "steps": 3},
    )
    study = json.loads(path.read_text())
    del study["tuning"]
    path.write_text(json.dumps(study))
    use_pooled_inception(monkeypatch)
    out = tmp_path / "out"
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(out)]))
    data = json.loads((out / "report.json").read_text())
    assert set(data["results"]) == {"ADM", "+EMA", "+SAM-rho0.01", "+SAM-rho0.01+EMA"}
    adm = data["results"]["ADM"]["1"]
    assert adm["fid_num_real"] == 100 and set(adm["sensitivity"]["curves"]) == {"per_tensor", "per_channel"}
    # the declared claims only: the primary endpoint, then the family
    assert [(c["role"], c["rows"]) for c in data["claims"]] == [
        ("primary", "+SAM-rho0.01+EMA vs +EMA"),
        ("secondary", "+SAM-rho0.01 vs ADM"),
        ("secondary", "+SAM-rho0.01+EMA vs +EMA"),
    ]
    # the EMA pipelines were evaluated with their own flags: FID and 4-bit KID, no LPF
    ema = data["results"]["+EMA"]["1"]
    assert "lpf" not in ema and set(ema["quantization"]["levels"]) == {"4:per_channel"}
    # the training loss of each method's first seed, every step, read from its TensorBoard log
    assert {name: len(curve[1]) for name, curve in data["loss_curves"].items()} == {
        "adm-seed1": 3,
        "sam-rho0.01-seed1": 3,
    }
    # the picture the file names: its seeds, rows, variant and level, never one picked from the results
    assert data["figure"]["seeds"] == [1] and data["figure"]["level"] == "3:per_channel"
    assert set(data["figure"]["displacement"]) == {"+EMA, seed 1", "+SAM-rho0.01+EMA, seed 1"}
    report = (out / "report.md").read_text()
    assert "**Hypotheses tested: 3**" in report
    # the primary endpoint's level is stored for real by torchao: the int4 model, saved and reloaded, is checked
    assert data["deployment"]["identical"] and data["deployment"]["row"] == "+SAM-rho0.01+EMA"
    assert "**Deployment check**: +SAM-rho0.01+EMA, seed 1: the int4 model (torchao), saved and reloaded" in report
    for section in (
        "## Training: has the loss flattened?",
        "## The study's picture",
        "## Quantization-sensitivity curves",
    ):
        assert section in report
    # LPF during training, step by step, for each raw row
    series = data["results"]["+SAM-rho0.01"]["1"]["flatness_series"]
    assert [entry["step"] for entry in series] == [1, 2, 3] and "flatness_series" not in data["results"]["+EMA"]["1"]
    assert "![flatness during training](flatness_during_training.png)" in report
    figures = ("loss_curve.png", "sensitivity.png", "study_figure.png", "exposure_bias.png")
    for figure in (*figures, "flatness_during_training.png"):
        assert (out / figure).stat().st_size > 5_000, figure

    # What a study commits: --export copies what the report reads, no weights, event files or sample grids, and the
    # report written again from that copy alone (the figure and the deployment check kept, not redone) is the same.
    kept = tmp_path / "kept"
    run_study.main(
        run_study.parse_args(["--study", str(path), "--output_dir", str(out), "--report_only", "--export", str(kept)])
    )
    files = {f.relative_to(kept).as_posix() for f in kept.rglob("*") if f.is_file()}
    assert not [f for f in files if f.endswith((".safetensors", ".bin")) or "tfevents" in f or "/samples" in f]
    assert {"done/adm-seed1", "eval/adm-seed1-ema/eval_results.json", "runs/adm-seed1/loss_curve.json"} <= files
    assert {"figure.json", "deployment.json", "study_figure.png", "figure/adm-seed1.npz"} <= files
    shutil.rmtree(out)  # the runs are gone: the report must come from the copy alone
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(kept), "--report_only"]))
    again = json.loads((kept / "report.json").read_text())
    for key in ("results", "claims", "loss_curves", "figure", "deployment"):
        assert again[key] == data[key], key
    # the picture drawn again from the kept samples alone, without the weights: the same displacements
    (kept / "figure.json").unlink()
    run_study.main(run_study.parse_args(["--study", str(path), "--output_dir", str(kept), "--report_only"]))
    assert json.loads((kept / "report.json").read_text())["figure"] == data["figure"]


def test_a_report_with_fewer_seeds_than_the_study_fixes_says_it_is_interim(tmp_path):
    results = comparison_results()  # six seeds in every row
    settings = {
        "study": "s.yaml",
        "evaluation": [],
        "comparisons": [("ADM", "+SAM-rho0.01"), ("ADM", "+SAM-rho0.001")],
    }
    complete = write_report(results, settings | {"seeds": [1, 2, 3, 4, 5, 6]}, tmp_path / "complete")
    assert "Interim" not in complete
    del results["+SAM-rho0.001"][6], results["+SAM-rho0.001"][5], results["ADM"][6]  # rows of 5, 6 and 4 seeds
    interim = write_report(results, settings | {"seeds": list(range(1, 9))}, tmp_path / "interim")
    first = interim.split("\n\n")[1]
    assert first.startswith("Seeds per row: ADM 5, +SAM-rho0.01 6, +SAM-rho0.001 4.")
    assert "**Interim: the study fixes 8 seeds per row and 3 of its 3 rows have fewer;" in first
    assert "decide nothing" in first
