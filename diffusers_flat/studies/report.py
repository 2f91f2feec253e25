"""The report of a study: tables shaped like the paper's (mean ± standard deviation over seeds, and n), the claims
with their paired 95% intervals, p-values, Holm-adjusted p-values over the study's family and computed verdicts, and
figures with one band per row."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusers_flat.evaluation.measurements import NOT_MEASURED, Level, Measurements, Results, json_results
from diffusers_flat.evaluation.plots import (
    plot_bands,
    plot_flatness_during_training,
    plot_loss_curves,
    plot_study_sensitivity,
)
from diffusers_flat.quantization import GRANULARITIES
from diffusers_flat.run_directory import write_atomically, write_json
from diffusers_flat.studies.claims import (
    ALPHA,
    CLAIMS,
    COMPANION,
    DOES_NOT_HOLD,
    EXPLORATORY,
    HOLDS,
    INCONCLUSIVE,
    LADDER_MEASURES,
    PRIMARY,
    SECONDARY,
    Claim,
    comparison_claims,
    detectable_cell,
    exposure_gap,
    fraction_kept,
    holm,
    ladder_point,
    lpf,
    paired_interval,
    perturbation_slope,
    sharpness_excess,
    verdict,
)
from diffusers_flat.studies.config import ClaimSpec, row_name

ROW_ORDER = ("ADM", "+EMA", "+SWA", "+IP", "+IP+EMA", "+IP+SWA", "+SAM", "+SAM+EMA", "+SAM+SWA")


def mean_std(values: list[float]) -> str:
    """ "mean ± standard deviation (n=...)" of a table cell, "-" when empty."""
    if not values:
        return "-"
    std = f" ± {np.std(values, ddof=1):.4g}" if len(values) > 1 else ""
    return f"{np.mean(values):.4g}{std} (n={len(values)})"


def _column(results: Results, row: str, measure: Callable[[Measurements], float]) -> list[float]:
    values = []
    for result in results.get(row, {}).values():
        try:
            values.append(float(measure(result)))
        except NOT_MEASURED:
            continue  # not measured in this study
    return values


def row_order(results: Results) -> list[str]:
    """The paper's rows in Table 2's order, then any other rows (e.g. +SAM-rho0.01) in the study's order."""
    return [row for row in ROW_ORDER if row in results] + [row for row in results if row not in ROW_ORDER]


def _table(results: Results, columns: dict[str, Callable[[Measurements], float]]) -> str:
    rows = row_order(results)
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [mean_std(_column(results, row, measure)) for measure in columns.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_results(results: Results, claims: tuple[Claim, ...] | list[Claim] = CLAIMS) -> list[dict]:
    """Each claim's paired interval over the seeds both rows have, its p-value, and its verdict. A log-ratio claim is
    tested on log(treated) - log(base); its verdict is "undefined" when a value is not positive (e.g. a loss that 8-bit
    weights lowered), and it has no p-value. Where the claim has the paper's relative effect, "paper_scaled" is that
    change applied to the size of the base's mean (so that it keeps its direction whatever the base's sign).

    The secondary claims are one family: each gets "p_holm", its Holm-adjusted p-value over them all (a claim with no
    p-value counts as p = 1), and its verdict is read from it. The primary endpoint is tested alone at ALPHA;
    exploratory claims and companions (the plain difference beside a log ratio) keep their unadjusted verdicts."""
    out = []
    for claim in claims:
        base, treated = results.get(claim.base, {}), results.get(claim.treated, {})
        pairs = []
        for seed in sorted(set(base) & set(treated)):
            try:
                pairs.append((float(claim.measure(base[seed])), float(claim.measure(treated[seed]))))
            except NOT_MEASURED:
                continue
        a, b = np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs])
        undefined = claim.log_ratio and bool(pairs) and bool((a <= 0).any() or (b <= 0).any())
        if claim.log_ratio and not undefined:
            a, b = np.log(a), np.log(b)
        interval = paired_interval(a, b)
        scaled = None
        if claim.paper_relative is not None and pairs:
            scaled = claim.paper_relative * abs(float(np.mean([p[0] for p in pairs])))
        if not interval["n"]:
            outcome = "not measured"
        else:
            outcome = "undefined (a value <= 0)" if undefined else verdict(interval, claim.expected_sign)
        out.append(
            {
                "claim": claim.statement,
                "rows": f"{claim.treated} vs {claim.base}",
                "form": "log ratio" if claim.log_ratio else "difference",
                "role": claim.role,
                "ladder": None if claim.ladder is None else dict(zip(("level", "what"), claim.ladder)),
                "paper": claim.paper,
                "paper_scaled": scaled,
                "expected_sign": claim.expected_sign,
                "interval": interval,
                "p": math.nan if undefined else interval["p"],
                "p_holm": None,
                "verdict": outcome,
            }
        )
    family = [c for c in out if c["role"] == SECONDARY]
    for c, adjusted in zip(family, holm([c["p"] for c in family])):
        c["p_holm"] = adjusted
        if c["verdict"] in VERDICTS:
            c["verdict"] = verdict(c["interval"], c["expected_sign"], adjusted)
    return out


VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)


def family_summary(claims: list[dict], declared: bool) -> str:
    """The report's first lines on multiplicity: how many hypotheses were tested, how they were corrected, how many
    hold, and how many would have looked significant uncorrected against how many chance alone gives."""
    family = [c for c in claims if c["role"] == SECONDARY]
    primary = [c for c in claims if c["role"] == PRIMARY]
    exploratory = [c for c in claims if c["role"] == EXPLORATORY]
    raw = sum(not math.isnan(c["p"]) and c["p"] < ALPHA for c in family)
    holding = sum(c["verdict"] == "holds" for c in family)
    against = sum(c["verdict"] == "does not hold" for c in family)
    corrected = (
        f"{len(family)} secondary claims, corrected together by Holm's procedure (each verdict is read from its "
        f"Holm-adjusted p at {ALPHA}): {holding} hold and {against} go against the claim after correction; "
        f"{raw} had p < {ALPHA} before it, where chance alone gives about {ALPHA * len(family):.1f}"
    )
    if not declared:
        companions = any(c["role"] == COMPANION for c in claims)
        return (
            f"**Hypotheses tested: {len(family)}.** The study file names no primary endpoint (it predates them), so "
            f"every claim it pre-registered is one family: {corrected}."
            + (
                " Plain differences shown beside log ratios are the same hypotheses on another scale, not counted"
                " again."
                if companions
                else ""
            )
        )
    (p,) = primary
    lines = (
        f"**Hypotheses tested: {1 + len(family)}**: the primary endpoint, tested alone at {ALPHA},"
        f" and {corrected}.\n\n"
        f"**Primary endpoint** ({p['form']}): {p['claim']}: **{p['verdict']}**; measured {_effect(p)}, p = "
        f"{format_p(p['p'])}; the smallest effect this design detects with 80% power: {_detectable(p)}."
    )
    if exploratory:
        lines += f" {len(exploratory)} exploratory claims are reported uncorrected and decide nothing."
    return lines


def format_p(p: float | None) -> str:
    """A p-value as a report shows it: two significant digits below 0.01, else two decimals; "-" without one."""
    if p is None:
        return "-"
    return "-" if math.isnan(p) else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def _effect(c: dict) -> str:
    """A claim's measured effect: treated - base, or for a log ratio treated / base, with its 95% interval."""
    i = c["interval"]
    if i["n"] == 0:
        return "not measured"
    if c["form"] == "log ratio":
        if c["verdict"].startswith("undefined"):
            return f"(n={i['n']})"
        if math.isnan(i["low"]):
            return f"×{math.exp(i['mean']):.3g} (n={i['n']}: no interval)"
        return f"×{math.exp(i['mean']):.3g} [×{math.exp(i['low']):.3g}, ×{math.exp(i['high']):.3g}] (n={i['n']})"
    if math.isnan(i["low"]):
        return f"{i['mean']:+.4g} (n={i['n']}: no interval)"
    return f"{i['mean']:+.4g} [{i['low']:+.4g}, {i['high']:+.4g}] (n={i['n']})"


def _detectable(c: dict) -> str:
    """The minimum detectable effect: ±d for a difference, the ratio ×exp(-d) a log-ratio claim would detect."""
    d = c["interval"].get("detectable", math.nan)
    if c["form"] == "log ratio":
        undefined = c["verdict"].startswith("undefined")  # the interval is of the values, not of their logs
        return "-" if math.isnan(d) or undefined else f"×{math.exp(-d):.3g} or ×{math.exp(d):.3g}"
    return detectable_cell(c["interval"])


def _claims_table(claims: list[dict]) -> str:
    lines = [
        "| claim | role | rows | form | paper | paper's effect in our units | measured effect, 95% interval | "
        "detectable (80% power) | p | Holm p | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        scaled = "-" if c.get("paper_scaled") is None else f"{c['paper_scaled']:+.4g}"
        cells = [
            c["claim"],
            c["role"],
            c["rows"],
            c["form"],
            c["paper"],
            scaled,
            _effect(c),
            _detectable(c),
            format_p(c["p"]),
            format_p(c["p_holm"]),
            f"**{c['verdict']}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_claims(results: Results, settings: dict) -> list[Claim]:
    """The claims the study file declares (`settings["primary"]`, "family" and "exploratory": ClaimSpec fields);
    else the paper's claims (CLAIMS) for the paper's grid; else, for a study with `settings["comparisons"]` (rows
    that are not the paper's, e.g. SAM at two rho), the pre-registered claims of each comparison
    (`comparison_claims`)."""
    if settings.get("primary"):
        declared = [(PRIMARY, settings["primary"])] + [
            (role, spec)
            for role, key in ((SECONDARY, "family"), (EXPLORATORY, "exploratory"))
            for spec in settings[key]
        ]
        return [ClaimSpec(**spec).claim(role) for role, spec in declared]
    if not settings.get("comparisons"):
        return list(CLAIMS)
    any_result = _any(results)
    steps = sorted(any_result.fid)
    quantized = sorted(any_result.by_bits(), reverse=True)
    curves = any_result.sensitivity.curves if any_result.sensitivity else {}
    ladder = {g: sorted(curves[g], reverse=True) for g in sorted(curves, key=GRANULARITIES.index)}
    return [
        claim
        for base, treated in settings["comparisons"]
        for claim in comparison_claims(base, treated, steps, quantized, ladder)
    ]


def _any(results: Results) -> Measurements:
    """One result of the study (empty measurements where there is none): what its tables' columns are read from."""
    return next((r for seeds in results.values() for r in seeds.values()), Measurements())


def _figure_sampler(figure: dict) -> str:
    """How the figure's samples were drawn: a pipeline sampler, or (figures made before there were any) the PF-ODE."""
    if "sampler" not in figure:
        return "the probability-flow ODE, DDIM without clipping, 20 steps"
    return f"{'DDIMPipeline, eta = 0' if figure['sampler'] == 'ddim' else 'DDPMPipeline'}, {figure['steps']} steps"


def _deployment_line(deployment: dict | None) -> list[str]:
    """One line: does the real low-bit model, saved and reloaded, draw what the study measured?"""
    if not deployment:
        return []
    same = "the same" if deployment["identical"] else f"other (up to {deployment['max_difference']} of 255)"
    level = Level.parse(deployment["level"]).words
    return [
        f"**Deployment check**: {deployment['row']}, seed {deployment['seed']}: the int{deployment['bits']} model "
        f"(torchao), saved and reloaded, draws {same} samples as the direct {level} model "
        f"from {deployment['num_images']} noises"
        + (", so the same KID." if deployment["identical"] else ": the study's numbers are not the deployed model's.")
    ]


def _figure_section(figure: dict | None) -> list[str]:
    """The study's picture: named in the study file (it has "seeds"), or, in reports of studies made before files
    named their pictures, one level picked from the results, which the text says."""
    if not figure:
        return []
    moved = ", ".join(f"{label} {value:.1f}" for label, value in figure["displacement"].items())
    if "seeds" in figure:
        level = Level.parse(figure["level"]).words
        return [
            "## The study's picture",
            f"Named in the study file before any run: seeds {', '.join(map(str, figure['seeds']))}, the "
            f"{figure['variant']} pipelines of {', '.join(figure['rows'])}, {figure['noises']} samples each from the "
            f"same noises at fp32 and with {level} weights ({_figure_sampler(figure)}). "
            f"Pixels moved (mean absolute change, 0-255): {moved}.",
            f"![the same noises at fp32 and {level}]({figure['path']})",
        ]
    return [
        "## The answer in one picture (picked after the results)",
        f"Seed {figure['seed']}, raw pipelines: samples from the same noises at fp32 and with "
        f"{figure['bits']}-bit {figure['granularity']} weights ({_figure_sampler(figure)}), the ladder level where "
        "the mean paired displacement of ADM exceeded the flat row's the most: a level chosen from the data, so an "
        f"illustration, not evidence (the claims decide). Pixels moved by these samples: {moved}.",
        f"![the same noises at fp32 and {figure['bits']} bits]({figure['path']})",
    ]


def _tuning_section(tuning: dict, rows: list[dict]) -> list[str]:
    """The tuning table: the selection metric (and its companion) of each candidate value, and the baseline."""
    steps = tuning["inference_steps"]
    title = (
        f"## Tuning of {tuning['flag']} ({tuning['method']}, seed {tuning['seed']}, excluded from the claims)\n\n"
        f"Selected by the lowest {tuning['metric'].upper()} at T'={steps} of the {tuning['variant']} pipeline, a "
        "rule fixed in the study file before any run; the grid's "
        f"{tuning['method']} runs use {tuning['flag']} **{tuning['selected'] or '(not yet selected)'}**."
    )
    lines = [f"| {tuning['flag']} | FID (T'={steps}) | KID x10³ (T'={steps}) | selected |", "|---|---|---|---|"]
    for row in rows:
        label = row["value"] if row["value"] is not None else f"{row['run']} (reference)"
        r = None if row["result"] is None else Measurements.from_json(row["result"])
        cells = ["not finished"] * 2 if r is None else [f"{r.fid[steps]:.2f}", f"{1e3 * r.kid[steps]['mean']:.2f}"]
        mark = "**yes**" if row.get("selected") else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {mark} |")
    return [title, "\n".join(lines)]


def _ladder_section(results: Results, claims: list[dict]) -> list[str]:
    """The quantization-sensitivity curves: each row's mean ± sd per level, the figure, and per comparison the
    ladder claims (log ratio, the plain difference beside)."""
    sensitivity = next((r.sensitivity for seeds in results.values() for r in seeds.values() if r.sensitivity), None)
    if sensitivity is None:
        return []
    curves = sensitivity.curves
    levels = [(g, b) for g in sorted(curves, key=GRANULARITIES.index) for b in sorted(curves[g], reverse=True)]
    rows = row_order(results)
    tables = []
    for name, what in LADDER_MEASURES.items():
        lines = [f"| {what} | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
        for g, b in levels:
            cells = [mean_std(_column(results, row, ladder_point(g, b, name))) for row in rows]
            lines.append(f"| {b}-bit {g} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    sections = [
        "## Quantization-sensitivity curves",
        f"Paired with fp32, at each level of the ladder: the increase of the fixed diffusion loss and the mean pixel "
        f"displacement (0-255) of {sensitivity.num_samples} DDIM (eta = 0) samples from the same "
        f"noises, {sensitivity.steps} steps (ancestral displacements in report.json). Per tensor: "
        "our symmetric grid, codes ±(2^(b-1) - 1); per channel: torchao's, codes -2^(b-1) .. 2^(b-1) - 1.",
        *tables,
        "![quantization sensitivity](sensitivity.png)",
    ]
    ladder = [c for c in claims if c["ladder"]]
    for rows in dict.fromkeys(c["rows"] for c in ladder):
        mine = [c for c in ladder if c["rows"] == rows]
        lines = [
            "| level | measure | ratio, 95% interval | detectable ratio | p | Holm p | verdict | difference "
            "(uncorrected) | its verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for ratio, difference in zip(mine[::2], mine[1::2]):
            level, measure = ratio["ladder"]["level"], ratio["ladder"]["what"]
            cells = [
                level,
                measure,
                _effect(ratio),
                _detectable(ratio),
                format_p(ratio["p"]),
                format_p(ratio["p_holm"]),
            ]
            cells += [f"**{ratio['verdict']}**", _effect(difference), difference["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
        sections += [f"### Ladder claims: {rows}", "\n".join(lines)]
    return sections


def _quality_rule_section(results: Results, settings: dict) -> list[str]:
    """Which of several treated rows the digits study's quality-tuning rule (lowest mean KID at the first T' of the
    raw pipeline) would pick, and whether the two best differ beyond their paired interval."""
    treated = [t for b, t in settings.get("comparisons", []) if b == "ADM"]
    steps = sorted(_any(results).kid)
    if len(treated) < 2 or not steps:
        return []
    kid = {row: _column(results, row, lambda r: 1e3 * r.kid[steps[0]]["mean"]) for row in treated}
    ranked = sorted((row for row in treated if kid[row]), key=lambda row: np.mean(kid[row]))
    if len(ranked) < 2:
        return []
    best, second = ranked[:2]
    seeds = sorted(set(results[best]) & set(results[second]))
    pair = paired_interval(
        [1e3 * results[second][s].kid[steps[0]]["mean"] for s in seeds],
        [1e3 * results[best][s].kid[steps[0]]["mean"] for s in seeds],
    )
    means = ", ".join(f"{row} {np.mean(kid[row]):.4g}" for row in ranked)
    difference = _effect({"form": "difference", "interval": pair})
    return [
        "## Which row the quality rule picks",
        f"The digits study tuned rho by the lowest KID at T'={steps[0]} of the raw pipeline. Applied to these rows "
        f"(mean KID x10³: {means}), it picks **{best}**; {best} - {second} = {difference} "
        "x10³ (paired over seeds). A flat row that costs quality and a quality-tuned row that is barely flatter are "
        "different answers: both are in the claims below.",
    ]


GOAL = 0.8  # the fraction of the whole effect a cheaper method is asked to keep (issue 22)


def fractions_kept(results: Results, fraction: dict, variants: list[str]) -> list[dict]:
    """For each variant and each method other than ADM and `fraction["of"]`: the fraction of of's effect relative to
    ADM it keeps (`fraction_kept`, paired over the seeds all three rows have) on LPF, and at the ladder level on the
    fixed-loss increase and the DDIM displacement (on their logs: damage varies multiplicatively between seeds), and
    whether it keeps at least GOAL of each: "yes" (every interval above GOAL), "no" (one below), else "undecided"."""
    g, bits = fraction["granularity"], int(fraction["bits"])
    level = f"{bits}-bit {g}"
    measures = {
        "LPF": (lpf, False),
        f"fixed-loss increase, {level}": (ladder_point(g, bits, "loss_increase"), True),
        f"DDIM displacement, {level}": (ladder_point(g, bits, "ddim_displacement"), True),
    }
    out = []
    for variant in variants:
        base, full = row_name("ADM", variant), row_name(fraction["of"], variant)
        for method in fraction["methods"]:
            row, kept = row_name(method, variant), {}
            for name, (measure, log) in measures.items():
                seeds = sorted(set(results.get(base, {})) & set(results.get(full, {})) & set(results.get(row, {})))
                try:
                    values = np.array([[measure(results[r][s]) for r in (base, full, row)] for s in seeds], float)
                except NOT_MEASURED:
                    continue  # not measured
                if values.size and not (log and (values <= 0).any()):
                    kept[name] = fraction_kept(*(np.log(values) if log else values).T)
            lows, highs = [k["low"] for k in kept.values()], [k["high"] for k in kept.values()]
            goal = "no" if any(h < GOAL for h in highs) else "yes" if lows and min(lows) >= GOAL else "undecided"
            out.append({"row": row, "of": full, "base": base, "kept": kept, "goal": goal if kept else "not measured"})
    return out


def _fraction_cell(kept: dict | None) -> str:
    if kept is None:
        return "not measured"
    if math.isinf(kept["low"]):
        return f"{kept['estimate']:.2f}, unbounded (n={kept['n']})"
    return f"{kept['estimate']:.2f} [{kept['low']:.2f}, {kept['high']:.2f}] (n={kept['n']})"


def _fraction_section(rows: list[dict]) -> list[str]:
    """The fractions kept, one row per method and variant."""
    if not rows:
        return []
    measures = list(dict.fromkeys(name for row in rows for name in row["kept"]))
    lines = ["| row | of | " + " | ".join(f"{m} kept" for m in measures) + f" | keeps ≥ {GOAL:.0%} of each |"]
    lines.append("|---|---|" + "---|" * len(measures) + "---|")
    for row in rows:
        cells = [_fraction_cell(row["kept"].get(m)) for m in measures]
        lines.append(f"| {row['row']} | {row['of']} | " + " | ".join(cells) + f" | **{row['goal']}** |")
    return [
        "## Fraction of the effect kept",
        "(base - row) / (base - of), paired over seeds, with Fieller's 95% interval; 1 keeps all of the effect, 0 "
        "none. LPF as it is, the quantization damage on its log scale. *Unbounded*: the whole effect itself is not "
        f"distinct from zero, so there is no fraction to measure. *Keeps ≥ {GOAL:.0%}*: yes when every interval lies "
        f"above it, no when one lies below, else undecided. These {sum(len(row['kept']) for row in rows)} intervals "
        "are not corrected for how many there are: read them as exploratory.",
        "\n".join(lines),
    ]


def _reuse_section(reuse: dict) -> list[str]:
    """Which runs were read from another study's report, and the check that they reproduce: the first seed, trained
    again here, beside the other study's run of the same flags."""
    runs = "; ".join(f"{method} seeds {', '.join(map(str, seeds))}" for method, seeds in reuse["runs"].items())
    measures = {
        "loss L(w)": lambda r: r.loss,
        "LPF": lpf,
        "FID (first T')": lambda r: r.fid[min(r.fid, default=None)],
    }
    lines = ["| row | seed | " + " | ".join(f"{m} here | {m} there" for m in measures) + " |"]
    lines.append("|---|---|" + "---|---|" * len(measures))
    for check in reuse["reproduction"]:
        cells = []
        here, there = (None if r is None else Measurements.from_json(r) for r in (check["here"], check["there"]))
        for measure in measures.values():
            for result in (here, there):
                try:
                    cells.append(f"{measure(result):.6g}")
                except NOT_MEASURED:
                    cells.append("not finished" if result is None else "-")
        lines.append(f"| {check['row']} | {check['seed']} | " + " | ".join(cells) + " |")
    return [
        "## Reused runs",
        f"Read from {reuse['report']} ({reuse['study']}) instead of trained again, with the same training and "
        f"evaluation flags: {runs}. Training and evaluation are deterministic; the first seed was trained again here "
        "as the check:",
        "\n".join(lines),
    ]


def _training_section(loss_curves: dict[str, tuple[list[int], list[float]]]) -> list[str]:
    """The training loss of the first seed's runs, and whether it has flattened: the mean of the last fifth of the
    steps against the fifth before it."""
    if not loss_curves:
        return []
    lines = ["| run | steps | mean loss, steps 60-80% | mean loss, steps 80-100% | change |", "|---|---|---|---|---|"]
    for name, (steps, losses) in loss_curves.items():
        n = len(losses)
        before, last = np.mean(losses[3 * n // 5 : 4 * n // 5]), np.mean(losses[4 * n // 5 :])
        lines.append(f"| {name} | {steps[-1]} | {before:.4g} | {last:.4g} | {100 * (last / before - 1):+.1f}% |")
    return [
        "## Training: has the loss flattened?",
        "The training loss (per step, a moving average of 50 in the figure) of each method's first seed.",
        "\n".join(lines),
        "![training loss](loss_curve.png)",
    ]


def _interim(results: Results, seeds: list[int] | None) -> str:
    """The warning a report carries while rows have fewer seeds than the study fixes (`seeds`: the study's)."""
    short = sum(len(done) < len(seeds) for done in results.values()) if seeds else 0
    if not short:
        return ""
    return (
        f" **Interim: the study fixes {len(seeds)} seeds per row and {short} of its {len(results)} rows have "
        "fewer; the verdicts below are computed on the seeds finished so far and decide nothing: the study is read "
        "once, when every run has finished.**"
    )


def write_report(
    results: Results,
    settings: dict,
    out: str | os.PathLike,
    tuning_rows: list[dict] | None = None,
    loss_curves: dict[str, tuple[list[int], list[float]]] | None = None,
    figure: dict | None = None,
    deployment: dict | None = None,
) -> str:
    """Write report.md, report.json and the figures into `out`; returns the Markdown. With a tuning in
    `settings["tuning"]`, `tuning_rows` are its runs: {"run", "value" (None: the baseline), "result", "selected"}.
    `loss_curves`: run name -> (steps, training losses), drawn as the evidence of training length. `figure`: the
    Figure 2 kind of picture already written into `out` ({"path", "seed", "granularity", "bits", "displacement"}).
    `deployment`: the deployment check at the primary endpoint's level (`StudyResults.deployment`), one line."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    any_result = _any(results)
    quality = {}
    for s in sorted(any_result.fid):
        quality[f"FID (T'={s})"] = lambda r, s=s: r.fid[s]
        quality[f"KID x10³ (T'={s})"] = lambda r, s=s: 1e3 * r.kid[s]["mean"]
    flatness = {
        "loss L(w)": lambda r: r.loss,
        "LPF": lpf,
        "LPF - L(w)": sharpness_excess,
        "perturbation slope": perturbation_slope,
        "exposure gap (sq. norm)": exposure_gap,
        "memorization": lambda r: r.memorization["memorization_ratio"],
    }
    quantized = any_result.by_bits()
    quantization = {}
    for b in sorted(quantized, reverse=True):
        for s in sorted(quantized[b].fid):
            quantization[f"{b}-bit ΔFID (T'={s})"] = lambda r, b=b, s=s: r.by_bits()[b].fid[s] - r.fid[s]
            quantization[f"{b}-bit ΔKID x10³ (T'={s})"] = lambda r, b=b, s=s: (
                1e3 * (r.by_bits()[b].kid[s]["mean"] - r.kid[s]["mean"])
            )
            quantization[f"{b}-bit pixels moved (T'={s})"] = lambda r, b=b, s=s: r.by_bits()[b].pixel_displacement[s]
        quantization[f"{b}-bit Δloss"] = lambda r, b=b: r.by_bits()[b].loss_increase
    claims = claim_results(results, study_claims(results, settings))
    main_claims = [c for c in claims if not c["ladder"]]
    sections = [
        "# Flatness study report",
        f"Seeds per row: {', '.join(f'{row} {len(seeds)}' for row, seeds in results.items())}. Study "
        f"{settings.get('study')}; evaluation flags: `{' '.join(settings.get('evaluation', [])) or '(defaults)'}`"
        + (
            f"; FID and KID from {any_result.fid_num_generated} generated against {any_result.fid_num_real} "
            "real images"
            if any_result.fid_num_generated is not None
            else ""
        )
        + "."
        + _interim(results, settings.get("seeds")),
        family_summary(claims, bool(settings.get("primary"))),
        *_deployment_line(deployment),
        *(_tuning_section(settings["tuning"], tuning_rows or []) if "tuning" in settings else []),
        *(_reuse_section(settings["reuse"]) if "reuse" in settings else []),
        *_training_section(loss_curves or {}),
        "## Quality (Table 2)",
        _table(results, quality) if quality else "(FID not measured)",
        *_quality_rule_section(results, settings),
        "## Flatness and exposure bias (Tables 1 and 3)",
        _table(results, flatness),
    ]
    if any(r.flatness_series for seeds in results.values() for r in seeds.values()):
        sections += [
            "LPF estimated during training (`--flatness_every`: a few draws on fixed triples, the same all run long):",
            "![flatness during training](flatness_during_training.png)",
        ]
    if quantization:
        sections += [
            "## Quantization robustness (Table 4), paired with fp32: FID and KID after minus before, the mean pixel "
            "displacement of the samples (0-255, same noise) and the increase of the fixed diffusion loss",
            _table(results, quantization),
        ]
    sections += _ladder_section(results, claims)
    fractions = (
        fractions_kept(results, settings["fraction_kept"], settings["variants"]) if "fraction_kept" in settings else []
    )
    sections += _fraction_section(fractions)
    sections += _figure_section(figure)
    sections += [
        "## Claims",
        "Each claim is a paired difference over seeds (same seed: same data order and noise), with a 95% "
        "t-interval and the paired t-test's two-sided p; **holds** when it is significant in the claimed direction, "
        "**does not hold** when significant in the other, else **inconclusive**. The primary endpoint is read from "
        f"its own p, each secondary claim from its *Holm p* (adjusted over the family, at {ALPHA}), exploratory "
        "claims from their uncorrected p. Computed, never written by hand. A *log ratio* claim tests "
        "log(treated / base), shown as the ratio. *Detectable*: the smallest true effect this design (its n and the "
        "measured spread of the differences) finds with 80% power, uncorrected; an inconclusive verdict on an "
        "effect below it says the design was blind to it. *Paper's effect in our units*: the paper's relative "
        "change applied to the size of the base row's mean here, in the claim's direction.",
        _claims_table(main_claims),
        "![exposure bias](exposure_bias.png)",
    ]
    if any(r.perturbation for seeds in results.values() for r in seeds.values()):
        sections.append("![loss under perturbation](perturbation.png)")
        plot_bands(results, row_order(results), "perturbation", out / "perturbation.png")
    markdown = "\n\n".join(sections) + "\n"
    plot_bands(results, row_order(results), "exposure_bias", out / "exposure_bias.png")
    if any(r.sensitivity for seeds in results.values() for r in seeds.values()):
        plot_study_sensitivity(results, row_order(results), out / "sensitivity.png")
    if loss_curves:
        plot_loss_curves(loss_curves, out / "loss_curve.png")
    if any(r.flatness_series for seeds in results.values() for r in seeds.values()):
        plot_flatness_during_training(results, row_order(results), out / "flatness_during_training.png")
    data = {"settings": settings, "results": json_results(results), "claims": claims, "tuning": tuning_rows or []}
    data.update(loss_curves=loss_curves or {}, figure=figure, fractions=fractions, deployment=deployment)
    write_json(out / "report.json", data, indent=None)  # committed: compact
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(markdown))
    return markdown
