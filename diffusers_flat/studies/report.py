"""The report of a study: tables shaped like the paper's (mean ± standard deviation over seeds, and n), the paper's
claims with their paired 95% intervals and computed verdicts, and figures with one band per row."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusers_flat.evaluation.plots import plot_bands
from diffusers_flat.run_directory import write_atomically, write_json
from diffusers_flat.studies.claims import (
    CLAIMS,
    detectable_cell,
    lpf,
    paired_interval,
    perturbation_slope,
    sharpness_excess,
    verdict,
)

# row -> seed -> the evaluation result of that row's pipeline at that seed
Results = dict[str, dict[int, dict]]
ROW_ORDER = ("ADM", "+EMA", "+SWA", "+IP", "+IP+EMA", "+IP+SWA", "+SAM", "+SAM+EMA", "+SAM+SWA")


def mean_std(values: list[float]) -> str:
    """ "mean ± standard deviation (n=...)" of a table cell, "-" when empty."""
    if not values:
        return "-"
    std = f" ± {np.std(values, ddof=1):.4g}" if len(values) > 1 else ""
    return f"{np.mean(values):.4g}{std} (n={len(values)})"


def _column(results: Results, row: str, measure: Callable[[dict], float]) -> list[float]:
    values = []
    for result in results.get(row, {}).values():
        try:
            values.append(float(measure(result)))
        except (KeyError, TypeError):
            continue  # not measured in this study
    return values


def _table(results: Results, columns: dict[str, Callable[[dict], float]]) -> str:
    rows = [row for row in ROW_ORDER if row in results]
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [mean_std(_column(results, row, measure)) for measure in columns.values()]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_results(results: Results) -> list[dict]:
    """Each claim's paired interval over the seeds both rows have, and its verdict."""
    out = []
    for claim in CLAIMS:
        base, treated = results.get(claim.base, {}), results.get(claim.treated, {})
        pairs = []
        for seed in sorted(set(base) & set(treated)):
            try:
                pairs.append((claim.measure(base[seed]), claim.measure(treated[seed])))
            except (KeyError, TypeError):
                continue
        interval = paired_interval([a for a, _ in pairs], [b for _, b in pairs])
        out.append(
            {
                "claim": claim.statement,
                "rows": f"{claim.treated} vs {claim.base}",
                "paper": claim.paper,
                "expected_sign": claim.expected_sign,
                "interval": interval,
                "verdict": verdict(interval, claim.expected_sign) if interval["n"] else "not measured",
            }
        )
    return out


def _claims_table(claims: list[dict]) -> str:
    lines = [
        "| claim | rows | paper | measured effect (treated - base), 95% interval | detectable (80% power) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        i = c["interval"]
        if i["n"] == 0:
            effect = "not measured"
        elif math.isnan(i["low"]):
            effect = f"{i['mean']:+.4g} (n={i['n']}: no interval)"
        else:
            effect = f"{i['mean']:+.4g} [{i['low']:+.4g}, {i['high']:+.4g}] (n={i['n']})"
        detectable = detectable_cell(i)
        lines.append(f"| {c['claim']} | {c['rows']} | {c['paper']} | {effect} | {detectable} | **{c['verdict']}** |")
    return "\n".join(lines)


def _moved(result: dict, bits: str, steps: str) -> float:
    return result["quantization"]["pixel_displacement"][bits][steps]


def _tuning_section(tuning: dict, rows: list[dict]) -> list[str]:
    """The tuning table: the selection metric (and its companion) of each candidate value, and the baseline."""
    steps = str(tuning["inference_steps"])
    title = (
        f"## Tuning of {tuning['flag']} ({tuning['method']}, seed {tuning['seed']}, excluded from the claims)\n\n"
        f"Selected by the lowest {tuning['metric'].upper()} at T'={steps} of the {tuning['variant']} pipeline, a "
        "rule fixed in the study file before any run; the grid's "
        f"{tuning['method']} runs use {tuning['flag']} **{tuning['selected'] or '(not yet selected)'}**."
    )
    lines = [f"| {tuning['flag']} | FID (T'={steps}) | KID x10³ (T'={steps}) | selected |", "|---|---|---|---|"]
    for row in rows:
        label = row["value"] if row["value"] is not None else f"{row['run']} (reference)"
        r = row["result"]
        cells = (
            ["not finished"] * 2 if r is None else [f"{r['fid'][steps]:.2f}", f"{1e3 * r['kid'][steps]['mean']:.2f}"]
        )
        mark = "**yes**" if row.get("selected") else ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {mark} |")
    return [title, "\n".join(lines)]


def write_report(
    results: Results, settings: dict, out: str | os.PathLike, tuning_rows: list[dict] | None = None
) -> str:
    """Write report.md, report.json and the figures into `out`; returns the Markdown. With a tuning in
    `settings["tuning"]`, `tuning_rows` are its runs: {"run", "value" (None: the baseline), "result", "selected"}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    any_result = next((r for seeds in results.values() for r in seeds.values()), {})
    steps = sorted(any_result.get("fid", {}), key=int)
    quality = {}
    for s in steps:
        quality[f"FID (T'={s})"] = lambda r, s=s: r["fid"][s]
        quality[f"KID x10³ (T'={s})"] = lambda r, s=s: 1e3 * r["kid"][s]["mean"]
    flatness = {
        "loss L(w)": lambda r: r["loss"],
        "LPF": lpf,
        "LPF - L(w)": sharpness_excess,
        "perturbation slope": perturbation_slope,
        "exposure gap (sq. norm)": lambda r: r["exposure_bias"]["squared_norm_gap"],
        "memorization": lambda r: r["memorization"]["memorization_ratio"],
    }
    quantized_fid = any_result.get("quantization", {}).get("fid", {})
    quantization = {}
    for b in sorted(quantized_fid, key=int, reverse=True):
        for s in sorted(quantized_fid[b], key=int):
            quantization[f"{b}-bit ΔFID (T'={s})"] = lambda r, b=b, s=s: r["quantization"]["fid"][b][s] - r["fid"][s]
            quantization[f"{b}-bit pixels moved (T'={s})"] = lambda r, b=b, s=s: _moved(r, b, s)
        quantization[f"{b}-bit Δloss"] = lambda r, b=b: r["quantization"]["loss_increase"][b]
    claims = claim_results(results)
    sections = [
        "# Flatness study report",
        f"Seeds per row: {', '.join(f'{row} {len(seeds)}' for row, seeds in results.items())}. Study "
        f"{settings.get('study')}; evaluation flags: `{' '.join(settings.get('evaluation', [])) or '(defaults)'}`"
        + (
            f"; FID and KID from {any_result['fid_num_generated']} generated against {any_result['fid_num_real']} "
            "real images"
            if "fid_num_generated" in any_result
            else ""
        )
        + ".",
        *(_tuning_section(settings["tuning"], tuning_rows or []) if "tuning" in settings else []),
        "## Quality (Table 2)",
        _table(results, quality) if quality else "(FID not measured)",
        "## Flatness and exposure bias (Tables 1 and 3)",
        _table(results, flatness),
    ]
    if quantization:
        sections += [
            "## Quantization robustness (Table 4), paired with fp32: FID after minus before, the mean pixel "
            "displacement of the samples (0-255, same noise) and the increase of the fixed diffusion loss",
            _table(results, quantization),
        ]
    sections += [
        "## Claims",
        "Each claim is a paired difference over seeds (same seed: same data order and noise), with a 95% "
        "t-interval; **holds** when the interval excludes zero in the paper's direction, **does not hold** when it "
        "excludes zero in the other, else **inconclusive**. Computed, never written by hand. *Detectable*: the "
        "smallest true effect this design (its n and the measured spread of the differences) finds with 80% power; "
        "an inconclusive verdict on an effect below it says the design was blind to it.",
        _claims_table(claims),
        "![loss under perturbation](perturbation.png)",
        "![exposure bias](exposure_bias.png)",
    ]
    markdown = "\n\n".join(sections) + "\n"
    plot_bands(results, ROW_ORDER, "perturbation", out / "perturbation.png")
    plot_bands(results, ROW_ORDER, "exposure_bias", out / "exposure_bias.png")
    data = {"settings": settings, "results": results, "claims": claims, "tuning": tuning_rows or []}
    write_json(out / "report.json", data)
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(markdown))
    return markdown
