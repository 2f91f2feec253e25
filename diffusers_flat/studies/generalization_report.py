"""The report of a generalization study (SPEC section 5): students trained on nested subsets of the data against a
teacher trained on all of it (E_gen) and against the empirical denoiser of their own subset (E_mem), their
memorization and quality against the training-set size, the claims that flatness helps at small sizes with paired
intervals and computed verdicts, and the empirical denoiser's memorization and quality against its temperature."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from diffusers_flat.evaluation.measurements import NOT_MEASURED, Measurements
from diffusers_flat.evaluation.plots import plot_generalization, plot_temperature_sweep
from diffusers_flat.run_directory import write_atomically, write_json
from diffusers_flat.studies.claims import ALPHA, detectable_cell, holm, paired_interval, verdict
from diffusers_flat.studies.report import family_summary, format_p, mean_std

# row -> training-set size -> seed -> the evaluation's measurements (E_mem in `pfd`, E_gen in `pfd_teacher`)
Students = dict[str, dict[int, dict[int, Measurements]]]

# (statement, measure name, expected sign of treated - base)
CLAIMS = (
    ("{treated} students are closer to the teacher (lower E_gen)", "E_gen", -1),
    ("{treated} students memorize less (lower memorization ratio)", "memorization", -1),
    ("{treated} students are farther from their training set's empirical denoiser (higher E_mem)", "E_mem", +1),
)


def _measures(steps: int | None) -> dict[str, Callable[[Measurements], float]]:
    measures = {
        "E_gen": lambda r: r.pfd_teacher["pfd"],
        "E_mem": lambda r: r.pfd["pfd"],
        "memorization": lambda r: r.memorization["memorization_ratio"],
        "held-out data's memorization": lambda r: r.memorization["held_out_ratio"],
    }
    if steps is not None:
        measures[f"KID x10³ (T'={steps})"] = lambda r: 1e3 * r.kid[steps]["mean"]
        measures[f"FID (T'={steps})"] = lambda r: r.fid[steps]
    return measures


def _values(results: dict[int, Measurements], measure: Callable[[Measurements], float]) -> dict[int, float]:
    values = {}
    for seed, result in results.items():
        try:
            values[seed] = float(measure(result))
        except NOT_MEASURED:
            continue  # not measured
    return values


def _cell(result: Measurements | None, measure: Callable[[Measurements], float]) -> str:
    values = _values({0: result} if result else {}, measure)
    return f"{values[0]:.4g}" if values else "-"


def _claims(measures: dict) -> list[tuple[str, str, int]]:
    """CLAIMS on the measures given, and the quality claim where KID was measured (its name carries the T')."""
    kid = [
        ("{treated} students' samples are closer to the held-out data (lower " + name + ")", name, -1)
        for name in measures
        if name.startswith("KID")
    ]
    return [claim for claim in CLAIMS if claim[1] in measures] + kid


def generalization_claims(students: Students, comparisons: list[tuple[str, str]], measures: dict) -> list[dict]:
    """Each claim at each training-set size: the paired difference treated - base over the seeds both rows have,
    with its p-value and its Holm-adjusted p over all of them (one family), from which its verdict is read. None
    when no claim pairs two seeds (a sweep of one seed per row)."""
    out = []
    for base, treated in comparisons:
        sizes = sorted(set(students.get(base, {})) & set(students.get(treated, {})))
        for statement, name, sign in _claims(measures):
            for size in sizes:
                a = _values(students[base][size], measures[name])
                b = _values(students[treated][size], measures[name])
                seeds = sorted(set(a) & set(b))
                interval = paired_interval([a[s] for s in seeds], [b[s] for s in seeds])
                out.append(
                    {
                        "claim": statement.format(treated=treated),
                        "rows": f"{treated} vs {base}",
                        "training_images": size,
                        "role": "secondary",
                        "expected_sign": sign,
                        "interval": interval,
                        "p": interval["p"],
                    }
                )
    if all(c["interval"]["n"] < 2 for c in out):
        return []
    for c, adjusted in zip(out, holm([c["p"] for c in out])):
        c["p_holm"] = adjusted
        c["verdict"] = verdict(c["interval"], c["expected_sign"], adjusted) if c["interval"]["n"] else "not measured"
    return out


def _effect(interval: dict) -> str:
    if interval["n"] == 0:
        return "not measured"
    if interval["n"] < 2:
        return f"{interval['mean']:+.4g} (n={interval['n']}: no interval)"
    return f"{interval['mean']:+.4g} [{interval['low']:+.4g}, {interval['high']:+.4g}] (n={interval['n']})"


def write_generalization_report(collected: dict, settings: dict, out: str | os.PathLike) -> str:
    """Write report.md, report.json and the figures of a generalization study into `out`; returns the Markdown.

    Args:
        collected: what report.json stores, as evaluation results (eval_results.json entries): {"students": row ->
            training-set size -> seed -> result, "teacher": its result or None, "noise_unconditional": the
            noise-unconditional student's result or None, "empirical": the sweep's results (each with "temperature"
            and "noise_unconditional")}.
        settings: the study's settings; "comparisons" lists (base row, treated row) pairs for the claims.
        out: the study's output directory.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    students: Students = {
        row: {size: {seed: Measurements.from_json(r) for seed, r in seeds.items()} for size, seeds in sizes.items()}
        for row, sizes in collected["students"].items()
    }
    teacher, unconditional = (
        None if collected.get(key) is None else Measurements.from_json(collected[key])
        for key in ("teacher", "noise_unconditional")
    )
    sweep = [Measurements.from_json(r) for r in collected.get("empirical") or []]
    any_result = next((r for sizes in students.values() for seeds in sizes.values() for r in seeds.values()), None)
    steps = min(any_result.kid, default=None) if any_result else None
    measures = _measures(steps)
    g = settings.get("generalization", {})
    lines = ["| row | training images | " + " | ".join(measures) + " |", "|---" * (len(measures) + 2) + "|"]
    for row, by_size in students.items():
        for size in sorted(by_size):
            cells = [mean_std(list(_values(by_size[size], m).values())) for m in measures.values()]
            lines.append(f"| {row} | {size} | " + " | ".join(cells) + " |")
    claims = generalization_claims(students, [tuple(c) for c in settings.get("comparisons", [])], measures)
    if not claims:  # a sweep of one seed per row has nothing to pair
        claim_lines = ["None: no two rows share two or more seeds at a training-set size, so nothing is paired."]
    else:
        claim_lines = [
            family_summary(claims, declared=False),
            "| claim | rows | training images | measured effect (treated - base), 95% interval "
            "| detectable (80% power) | p | Holm p | verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in claims:
            cells = [c["claim"], c["rows"], str(c["training_images"]), _effect(c["interval"])]
            cells += [detectable_cell(c["interval"]), format_p(c["p"]), format_p(c["p_holm"]), f"**{c['verdict']}**"]
            claim_lines.append("| " + " | ".join(cells) + " |")
    flags = settings.get("evaluation", [])
    smoothed = ("--pfd_reference", "smoothed") in zip(flags, flags[1:])
    e_mem = (
        "the paper's smoothed empirical score of its subset (tempered below the subset's collapse noise level, over "
        "its nearest images)"
        if smoothed
        else "the empirical denoiser of its subset at T = 1"
    )
    sections = [
        "# Generalization study report",
        f"Study {settings.get('study')}: students trained on nested random subsets of the data "
        f"({', '.join(map(str, g.get('subsets', [])))} images; training flags `{' '.join(g.get('training', []))}`), "
        f"a teacher ({g.get('teacher_method')}, seed {g.get('teacher_seed')}) trained on all of it. E_gen = "
        f"PFD(student, teacher), E_mem = PFD(student, {e_mem}), both from shared starting noise (`--pfd_*` flags "
        "below; the descriptor by default pixels scaled to unit norm); the memorization ratio against the student's "
        "own subset, beside the held-out data's own ratio against it where the dataset has a held-out split; KID "
        "and FID against the held-out split (else the whole dataset). Evaluation flags: "
        f"`{' '.join(settings.get('evaluation', []))}`; E_gen: `{' '.join(g.get('teacher_evaluation', []))}`.",
        "## Students (mean ± standard deviation over seeds)",
        "\n".join(lines),
        "The teacher: "
        + ", ".join(f"{name} {_cell(teacher, m)}" for name, m in measures.items() if name != "E_gen")
        + f" (E_mem against the {'smoothed empirical score' if smoothed else 'empirical denoiser'} of all the data).",
        "![E_gen, E_mem and memorization against the training-set size](generalization.png)",
        "## Claims",
        "Paired differences over seeds at each training-set size (same seed: same data order and noise), with a "
        "95% t-interval and the paired t-test's p; the claims are one family, each verdict read from its Holm-adjusted"
        f" p at {ALPHA}: **holds** when significant in the claimed direction, **does not hold** when significant in "
        "the other, else **inconclusive**. Computed, never written by hand. *Detectable*: the smallest true effect "
        "the design finds with 80% power (uncorrected).",
        "\n".join(claim_lines),
    ]
    if sweep:
        # the sweep has no PFD: memorization, and KID and FID at its own first T'
        by_name = _measures(min(sweep[0].kid) if steps is not None and sweep[0].kid else None).items()
        sweep_measures = {name: measure for name, measure in by_name if not name.startswith("E_")}
        table = ["| T | variant | " + " | ".join(sweep_measures) + " |", "|---" * (len(sweep_measures) + 2) + "|"]
        for r in sorted(sweep, key=lambda r: (r.noise_unconditional, r.temperature)):
            variant = "noise-unconditional" if r.noise_unconditional else "conditional on t"
            cells = [_cell(r, m) for m in sweep_measures.values()]
            table.append(f"| {r.temperature:g} | {variant} | " + " | ".join(cells) + " |")
        sections += [
            f"## The empirical denoiser of {g.get('empirical_subset')} training images against its temperature",
            "\n".join(table),
            "![memorization and quality against the temperature](temperature.png)",
        ]
        plot_temperature_sweep(sweep, sweep_measures, out / "temperature.png")
    if unconditional:
        sections += [
            "## Noise unconditioning: the learned UNet blind to the noise level against its closed form",
            f"A UNet trained with `--noise_unconditional` on the same {g.get('empirical_subset')} images (seed "
            f"{g.get('teacher_seed')}): "
            + ", ".join(f"{name} {_cell(unconditional, m)}" for name, m in measures.items())
            + " (E_mem against the noise-unconditional empirical denoiser, whose row is in the temperature table).",
        ]
    markdown = "\n\n".join(sections) + "\n"
    series = {
        name: {
            row: {size: list(_values(seeds, measures[name]).values()) for size, seeds in by_size.items()}
            for row, by_size in students.items()
        }
        for name in ("E_gen", "E_mem", "memorization")
    }
    plot_generalization(series, out / "generalization.png")
    data = {"settings": settings, **collected, "claims": claims}
    write_json(out / "report.json", data, indent=None)  # committed: compact
    write_atomically(out / "report.md", lambda tmp: tmp.write_text(markdown))
    return markdown
