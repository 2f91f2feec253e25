"""Model cards for trained output dirs: Hub metadata (library, pipeline tag, license, method tags, datasets,
model-index with the evaluation results), the training configuration, samples, a plain-diffusers loading snippet and
the quantization table, rendered from `model_cards/ddpm_flat.md` with huggingface_hub's ModelCard tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .tables import quantization_table, results_table

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "ddpm_flat.md"
VARIANTS = {"": "", "ema": "EMA", "swa": "SWA"}  # pipeline subdir -> label
TASK = "unconditional-image-generation"
CONFIGURATION = ["resolution", "model_config_name_or_path", "num_parameters", "max_train_steps", "total_batch_size",
                 "num_processes", "mixed_precision", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1",
                 "adam_beta2", "adam_weight_decay", "max_grad_norm", "ddpm_num_steps", "ddpm_beta_schedule",
                 "prediction_type", "sam_rho", "sam_adaptive", "sam_ascent", "use_ema", "ema_max_decay", "use_swa",
                 "swa_start_step", "swa_cycle", "input_perturbation", "seed"]  # fmt: skip


class ModelCardError(ValueError):
    """The directory is not a trained pipeline the card can describe."""


def methods(training_args: dict) -> list[tuple[str, str]]:
    """(tag, description) of each flat-minima method the run used."""
    used = []
    if training_args.get("sam_rho", 0) > 0:
        name = "asam" if training_args.get("sam_adaptive") else "sam"
        used.append((name, f"{name.upper()} (rho = {training_args['sam_rho']}, {training_args.get('sam_ascent')})"))
    if training_args.get("input_perturbation", 0) > 0:
        used.append(("input-perturbation", f"input perturbation (gamma = {training_args['input_perturbation']})"))
    if training_args.get("use_ema"):
        used.append(("ema", f"EMA (max decay {training_args.get('ema_max_decay')})"))
    if training_args.get("use_swa"):
        used.append(("swa", f"SWA (from step {training_args.get('swa_start_step')}, every "
                            f"{training_args.get('swa_cycle')} steps)"))  # fmt: skip
    return used


def read_evaluations(output_dir: str | os.PathLike) -> dict[str, dict]:
    """The latest evaluate_flat.py results of each pipeline in the dir, keyed by '', 'ema', 'swa'."""
    found = {}
    for subdir in VARIANTS:
        path = Path(output_dir, subdir, "evaluation", "eval_results.json")
        if path.is_file():
            found[subdir] = json.loads(path.read_text())
    return found


def _dataset(training_args: dict) -> tuple[str | None, str, str]:
    """(Hub dataset id or None, model-index dataset type, human-readable description)."""
    if training_args.get("dataset_name"):
        name = training_args["dataset_name"]
        return name, name, f"the `{name}` dataset"
    if training_args.get("train_data_dir"):
        return None, "imagefolder", "a local image folder"
    return None, "digits", "scikit-learn's bundled handwritten digits (1,797 UCI optdigits images, 8x8, upscaled)"


def _eval_results(evaluations: dict[str, dict], dataset_type: str, dataset_name: str) -> list[EvalResult]:
    results = []

    def add(metric_type: str, value: float, name: str) -> None:
        results.append(EvalResult(TASK, dataset_type, dataset_name, metric_type, round(float(value), 4),
                                  metric_name=name))  # fmt: skip

    for subdir, r in evaluations.items():
        weights = f", {VARIANTS[subdir]} weights" if subdir else ""
        for steps, fid in r.get("fid", {}).items():
            add("fid", fid, f"FID ({steps} steps, {r['fid_num_generated']} samples{weights})")
        for bits, fids in r.get("quantization", {}).get("fid", {}).items():
            for steps, fid in fids.items():
                add("fid", fid, f"FID ({steps} steps, {bits}-bit weights{weights})")
        if "lpf" in r:
            add("lpf", r["lpf"]["lpf"], f"LPF flatness (sigma {r['lpf']['sigma']}{weights})")
        if "exposure_bias" in r:
            add("exposure-bias", r["exposure_bias"]["squared_norm_gap"], f"Exposure bias gap, squared norm{weights}")
    return results


def build_model_card(
    output_dir: str | os.PathLike, repo_id: str | None = None, license: str = "apache-2.0"
) -> ModelCard:
    """The card of a train_flat_ddpm.py output dir, with whatever evaluation results it holds."""
    output_dir = Path(output_dir)
    if not (output_dir / "model_index.json").is_file():
        raise ModelCardError(f"{output_dir}: not a DDPMPipeline directory (no model_index.json)")
    args_path = output_dir / "training_args.json"
    training_args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    repo_id = repo_id or training_args.get("hub_model_id") or output_dir.resolve().name
    hub_dataset, dataset_type, dataset_description = _dataset(training_args)
    used = methods(training_args)
    evaluations = read_evaluations(output_dir)
    named = {f"{repo_id}{'-' + subdir if subdir else ''}": r for subdir, r in evaluations.items()}
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
    for subdir in evaluations:
        for file, title in (("fid_vs_bits.png", "FID against weight bits"),
                            ("perturbation.png", "Loss under random weight perturbation")):  # fmt: skip
            if Path(output_dir, subdir, "evaluation", file).is_file():
                label = f" ({VARIANTS[subdir]} weights)" if subdir else ""
                plots.append((title + label, "/".join(filter(None, [subdir, "evaluation", file]))))
    has_grid = (output_dir / "sample_grid.png").is_file()
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id,
        repo_id=repo_id,
        ddpm_num_steps=training_args.get("ddpm_num_steps", 1000),
        dataset_description=dataset_description,
        methods=", ".join(d for _, d in used) or "no flat-minima method (the ADM baseline)",
        sample_grid="sample_grid.png" if has_grid else None,
        sample_caption=f"{training_args.get('ddpm_num_inference_steps', '?')} DDPM sampling steps, seed "
                       f"{training_args.get('seed', '?')}, at the end of training.",  # fmt: skip
        averaged=[s for s in ("ema", "swa") if (output_dir / s / "model_index.json").is_file()],
        configuration=[(key, training_args[key]) for key in CONFIGURATION if key in training_args],
        evaluation=results_table(named, steps) if named else "",
        quantization=quantization_table(named),
        plots=plots,
    )


def write_model_card(output_dir: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write (or refresh) `README.md` in the output dir; the old card is replaced only once the new one is complete."""
    card = build_model_card(output_dir, repo_id)
    path = Path(output_dir) / "README.md"
    partial = path.with_name("README.md.partial")
    partial.write_text(str(card), encoding="utf-8")
    os.replace(partial, path)
    return path
