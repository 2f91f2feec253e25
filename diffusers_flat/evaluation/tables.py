"""Markdown tables of evaluation results, shaped like the paper's: Tables 2/3 (FID at T' steps, with the flatness
columns beside) and Table 4 (FID before -> after weight quantization). Shared by evaluate_flat.py and model cards."""

from __future__ import annotations

from diffusers_flat.evaluation.levels import quantization_levels


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(results: dict[str, dict], steps: list[int]) -> str:
    """One row per model: FID at each of `steps`, KID (x 10^3, mean ± std over subsets) where measured, LPF, the
    exposure-bias gap, the memorization ratio, and PFD (± its standard error) where measured."""
    kid_steps = steps if any("kid" in r for r in results.values()) else []
    with_pfd = any("pfd" in r for r in results.values())
    header = ["model"] + [f"FID ({s} steps)" for s in steps] + [f"KID x10³ ({s} steps)" for s in kid_steps]
    header += ["LPF", "exposure gap (sq. norm)", "memorization"] + (["PFD"] if with_pfd else [])
    lines = [_row(header), "|" + "---|" * len(header)]
    for name, r in results.items():
        row = [name] + [f"{r['fid'][str(s)]:.2f}" if str(s) in r.get("fid", {}) else "-" for s in steps]
        kids = [r.get("kid", {}).get(str(s)) for s in kid_steps]
        row += [f"{1e3 * k['mean']:.2f} ± {1e3 * k['std']:.2f}" if k else "-" for k in kids]
        row.append(f"{r['lpf']['lpf']:.4f} ± {r['lpf']['stderr']:.4f}" if "lpf" in r else "-")
        row.append(f"{r['exposure_bias']['squared_norm_gap']:+.3f}" if "exposure_bias" in r else "-")
        row.append(f"{r['memorization']['memorization_ratio']:.3f}" if "memorization" in r else "-")
        if with_pfd:
            row.append(f"{r['pfd']['pfd']:.3f} ± {r['pfd']['stderr']:.3f}" if "pfd" in r else "-")
        lines.append(_row(row))
    with_fid = [r for r in results.values() if "fid" in r]
    if with_fid:
        metrics = "FID and KID" if kid_steps else "FID"
        counts = f"{with_fid[0]['fid_num_generated']} generated and {with_fid[0]['fid_num_real']} real images"
        lines += ["", f"{metrics} from {counts} (the paper: 50,000 generated)."]
    for name, r in results.items():
        if "pfd" in r:
            p, against = r["pfd"], r["pfd_reference"]
            if against == "smoothed":
                smoothing, sigma_c = r["pfd_smoothing"], r["pfd_smoothing"]["collapse_sigma"]
                sigma_c = "no collapse" if sigma_c is None else f"{sigma_c:.3g}"
                against = (
                    f"the smoothed empirical score of its training set (collapse level sigma_c {sigma_c}, "
                    f"{smoothing['neighbours']} nearest images)"
                )
            elif against == "empirical":
                against = "the empirical denoiser of its training set (E_mem)"
            line = f"PFD of {name} against {against}: {p['num_noises']} shared noises, {p['solver']} in {p['steps']} "
            line += f"steps, on {p['descriptor']}"
            if "outside" in p:  # evaluations before flows were clamped do not have it
                mine, reference = p["outside"]
                line += f"; its flows end {mine:.3f} outside [-1, 1] (RMS; clamped before PFD), "
                line += f"the reference's {reference:.3f}"
            lines += ["", line + "."]
    return "\n".join(lines) + "\n"


def quantization_table(results: dict[str, dict]) -> str:
    """One row per model and step count: FID with fp32 weights -> FID at each quantized level (change), from the same
    noises. Empty when no model was evaluated quantized."""
    quantized = {name: quantization_levels(r) for name, r in results.items() if "quantization" in r}
    if not quantized:
        return ""
    levels = sorted(
        {(level["bits"], level["granularity"]) for q in quantized.values() for level in q.values()},
        key=lambda level: (-level[0], level[1]),
    )
    header = ["model", "steps", "FID fp32"] + [f"{b}-bit {g.replace('_', '-')}" for b, g in levels]
    lines = [_row(header), "|" + "---|" * len(header)]
    for name, q in quantized.items():
        for steps, before in results[name]["fid"].items():
            row = [name, steps, f"{before:.2f}"]
            for b, g in levels:
                after = q.get(f"{b}:{g}", {}).get("fid", {}).get(steps)
                row.append("-" if after is None else f"{before:.2f} → {after:.2f} ({after - before:+.2f})")
            lines.append(_row(row))
    fidelity = [
        f"| {name} | {key} | {steps} | {f['kept']:.1%} | {f['fp32_histogram_distance']:.3f} → "
        f"{f['histogram_distance']:.3f} |"
        for name, q in quantized.items()
        for key, level in q.items()
        for steps, f in level.get("class_fidelity", {}).items()
    ]
    if fidelity:
        lines += [
            "",
            "| model | level | steps | class kept | class histogram vs the held-out set's (fp32 → quantized) |",
            "|---|---|---|---|---|",
            *fidelity,
        ]
    sampler = next(iter(results.values())).get("quantization", {}).get("sampler", "ddpm")
    lines += [
        "",
        "Direct post-training quantization of every Conv2d and Linear weight, no fine-tuning, as in the paper's "
        f"Table 4; fp32 and quantized samples from the same noises ({sampler} pipeline).",
    ]
    return "\n".join(lines) + "\n"
