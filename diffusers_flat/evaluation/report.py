"""An evaluation's report on disk: one model's results, table, sample grids and plots, and the side-by-side report
of several models (results JSON, markdown tables, the comparison plots)."""

from __future__ import annotations

from pathlib import Path

from diffusers_flat.evaluation.plots import (
    plot_exposure_bias,
    plot_fid_vs_bits,
    plot_loss_surfaces,
    plot_nearest_neighbours,
    plot_perturbation_curves,
    plot_sensitivity,
)
from diffusers_flat.evaluation.real_images import RealImages
from diffusers_flat.evaluation.registry import Evaluation, EvaluationResult
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.evaluation.tables import quantization_table, results_table
from diffusers_flat.run_directory import write_atomically, write_json
from diffusers_flat.sampling import image_grid


def markdown_report(results: dict[str, EvaluationResult], steps: list[int]) -> str:
    """The results table (and the quantization table when there is one) of `results`, in markdown."""
    table4 = quantization_table(results)
    return results_table(results, steps) + (f"\n{table4}" if table4 else "")


def write_model_report(
    name: str, evaluation: Evaluation, settings: EvaluationSettings, real: RealImages, out: Path
) -> None:
    """One model's results, table, sample grids and plots in `out`; `eval_results.json` is written last, so its
    presence says the report is whole."""
    out.mkdir(parents=True, exist_ok=True)
    result = evaluation.result
    for steps, images in evaluation.samples.items():
        image_grid(images[:64]).save(out / f"samples_{steps}_steps.png")
    for (level, steps), images in evaluation.quantized_samples.items():
        bits, granularity = level.split(":")
        suffix = "" if granularity == "per_tensor" else f"_{granularity}"
        image_grid(images[:64]).save(out / f"samples_{steps}_steps_{bits}bit{suffix}.png")
    if "quantization" in result:
        plot_fid_vs_bits({name: result}, out / "fid_vs_bits.png")
    if "perturbation" in result:
        plot_perturbation_curves({name: result["perturbation"]}, out / "perturbation.png")
    if "sensitivity" in result:
        plot_sensitivity({name: result}, out / "sensitivity.png")
    if "memorization" in result:
        generated = evaluation.samples[max(evaluation.samples)]
        plot_nearest_neighbours(generated, real.training_images().uint8, evaluation.nearest, out / "memorization.png")
    report = markdown_report({name: result}, list(settings.inference_steps))
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(report))
    write_json(out / "eval_results.json", result)


def write_comparison(results: dict[str, EvaluationResult], settings: EvaluationSettings, out: Path) -> str:
    """Every model's results side by side in `out`: the results JSON, the markdown tables (returned) and the plots
    of the metrics measured."""
    write_json(out / "eval_results.json", results)
    report = markdown_report(results, list(settings.inference_steps))
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(report))
    if "perturbation" in settings.metrics:
        plot_perturbation_curves({n: r["perturbation"] for n, r in results.items()}, out / "perturbation.png")
    if "surface" in settings.metrics:
        plot_loss_surfaces({n: r["surface"] for n, r in results.items()}, out / "loss_surface.png")
    if "exposure_bias" in settings.metrics:
        plot_exposure_bias({n: r["exposure_bias"] for n, r in results.items()}, out / "exposure_bias.png")
    if settings.quantize:
        plot_fid_vs_bits(results, out / "fid_vs_bits.png")
    if "sensitivity" in settings.metrics:
        plot_sensitivity(results, out / "sensitivity.png")
    return report
