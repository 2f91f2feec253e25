"""Model cards for run directories: Hub metadata (library, pipeline tag, license, method tags, datasets, model-index
with the evaluation results), the training configuration, samples, a plain-diffusers loading snippet and the
quantization table, rendered with huggingface_hub's ModelCard tools from a Jinja template (by default
`templates/model_card.md`, shipped inside the package)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.levels import quantization_levels
from diffusers_flat.evaluation.tables import quantization_table, results_table
from diffusers_flat.run_directory import RunDirectory, write_atomically
from diffusers_flat.training.config import TrainingConfig, TrainingRecord

TASK = "unconditional-image-generation"
LABELS = {"raw": "", "ema": "EMA", "swa": "SWA"}


class ModelCardError(FlatError):
    """The directory is not a trained pipeline the card can describe, or the template cannot be read."""


def default_template() -> Path:
    """The card template that ships with the package."""
    return Path(str(resources.files(__package__).joinpath("templates", "model_card.md")))


def methods(record: TrainingRecord) -> list[tuple[str, str]]:
    """(tag, description) of each flat-minima method the run used."""
    used, c = [], record.config
    if c.uses_sam:
        name = "asam" if c.sam_adaptive else "sam"
        used.append((name, f"{name.upper()} (rho = {c.sam_rho}, {c.sam_ascent})"))
    if c.input_perturbation > 0:
        used.append(("input-perturbation", f"input perturbation (gamma = {c.input_perturbation})"))
    if c.use_ema:
        used.append(("ema", f"EMA (max decay {c.ema_max_decay})"))
    if c.use_swa:
        used.append(("swa", f"SWA (from step {record.resolved.get('swa_start_step')}, every {c.swa_cycle} steps)"))
    return used


def _dataset(config: TrainingConfig) -> tuple[str | None, str, str]:
    """(Hub dataset id or None, model-index dataset type, human-readable description)."""
    data = config.data
    if data.dataset_name:
        return data.dataset_name, data.dataset_name, f"the `{data.dataset_name}` dataset"
    if data.train_data_dir:
        return None, "imagefolder", "a local image folder"
    return None, "digits", "scikit-learn's bundled handwritten digits (1,797 UCI optdigits images, 8x8, upscaled)"


def _eval_results(evaluations: dict[str, dict], dataset_type: str, dataset_name: str) -> list[EvalResult]:
    results = []

    def add(metric_type: str, value: float, name: str) -> None:
        results.append(
            EvalResult(TASK, dataset_type, dataset_name, metric_type, round(float(value), 4), metric_name=name)
        )

    for variant, r in evaluations.items():
        weights = f", {LABELS[variant]} weights" if LABELS[variant] else ""
        for steps, fid in r.get("fid", {}).items():
            add("fid", fid, f"FID ({steps} steps, {r['fid_num_generated']} samples{weights})")
        for steps, kid in r.get("kid", {}).items():
            add("kid", kid["mean"], f"KID ({steps} steps, {r['fid_num_generated']} samples{weights})")
        for level in quantization_levels(r).values():
            precision = f"{level['bits']}-bit" + ("" if level["granularity"] == "per_tensor" else " per-channel")
            for steps, fid in level["fid"].items():
                add("fid", fid, f"FID ({steps} steps, {precision} weights{weights})")
        if "lpf" in r:
            add("lpf", r["lpf"]["lpf"], f"LPF flatness (sigma {r['lpf']['sigma']}{weights})")
        if "exposure_bias" in r:
            add("exposure-bias", r["exposure_bias"]["squared_norm_gap"], f"Exposure bias gap, squared norm{weights}")
    return results


def build_model_card(
    output_dir: str | os.PathLike,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    template: str | os.PathLike | None = None,
) -> ModelCard:
    """The card of a run directory, with whatever evaluation results it holds.

    Args:
        output_dir: the run directory.
        repo_id: the Hub repo the card names (default: the record's hub_model_id, else the directory's name).
        license: the license in the card's metadata.
        template: a Jinja card template (default: the run's recorded model_card_template, else the package's).
    """
    run = RunDirectory(output_dir)
    run.check_is_pipeline("output_dir", weights=False)
    record = TrainingRecord.of(run)  # None: a pipeline trained elsewhere
    config = TrainingConfig() if record is None else record.config
    template = Path(template or config.model_card_template or default_template())
    if not template.is_file():
        raise ModelCardError(f"template: no card template at {template}", parameter="template")
    repo_id = repo_id or config.hub_model_id or run.name
    hub_dataset, dataset_type, dataset_description = _dataset(config)
    used = [] if record is None else methods(record)
    grid_steps, seed = ("?", "?") if record is None else (config.ddpm_num_inference_steps, config.seed)
    evaluations = run.read_evaluations()
    named = {f"{repo_id}{'-' + variant if variant != 'raw' else ''}": r for variant, r in evaluations.items()}
    steps = sorted({int(s) for r in evaluations.values() for s in r.get("fid", {})})

    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=TASK,
        license=license,
        tags=["diffusers", "diffusers-flat", "ddpm", TASK, "flat-minima"] + [tag for tag, _ in used],
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo_id,
        eval_results=_eval_results(evaluations, dataset_type, dataset_description) or None,
    )
    plots = []
    for variant in evaluations:
        for file, title in (
            ("fid_vs_bits.png", "FID against weight bits"),
            ("perturbation.png", "Loss under random weight perturbation"),
        ):
            if (run.evaluation_path(variant) / file).is_file():
                label = f" ({LABELS[variant]} weights)" if LABELS[variant] else ""
                plots.append((title + label, (run.evaluation_path(variant) / file).relative_to(run.path).as_posix()))
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=repo_id,
        repo_id=repo_id,
        ddpm_num_steps=config.ddpm_num_steps,
        dataset_description=dataset_description,
        methods=", ".join(d for _, d in used) or "no flat-minima method (the ADM baseline)",
        sample_grid=run.sample_grid_path().name if run.sample_grid_path().is_file() else None,
        sample_caption=f"{grid_steps} DDPM sampling steps, seed {seed}, at the end of training.",
        averaged=[v for v in run.variants() if v != "raw"],
        configuration=[] if record is None else record.configuration(),
        evaluation=results_table(named, steps) if named else "",
        quantization=quantization_table(named),
        plots=plots,
    )


def write_model_card(
    output_dir: str | os.PathLike, repo_id: str | None = None, template: str | os.PathLike | None = None
) -> Path:
    """Write (or refresh) the run directory's card (`README.md`); the old card is replaced only once the new one is
    complete."""
    card = str(build_model_card(output_dir, repo_id, template=template))
    return write_atomically(RunDirectory(output_dir).card_path, lambda tmp: tmp.write_text(card, encoding="utf-8"))
