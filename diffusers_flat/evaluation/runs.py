"""Evaluating run directories (what train_flat_ddpm.py writes): each pipeline against the real images of its own
training set, its report written and published beside its weights (for the model card, the Hub and the Space), and
the models side by side. evaluate_flat.py and the study runner both call `evaluate_runs`, then refresh the runs'
model cards."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.evaluate import evaluate, resolve_device, set_fid_reference
from diffusers_flat.evaluation.real_images import RealImages, load_real_images
from diffusers_flat.evaluation.registry import EMPIRICAL_REFERENCES, EvaluationResult, empirical_reference
from diffusers_flat.evaluation.report import write_comparison, write_model_report
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.class_fidelity import load_classifier
from diffusers_flat.metrics.fid import FID, feature_network
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.sampling import check_sampler, check_steps
from diffusers_flat.training.config import training_config
from diffusers_flat.training.models import make_noise_unconditional
from diffusers_flat.utils.cli import share_cpu_threads


def load_reference(
    settings: EvaluationSettings, runs: dict[str, RunDirectory], variant: str, reference_variant: str, device
) -> DDPMPipeline | None:
    """The pfd metric's reference pipeline (None for 'empirical', built per model), and every model to evaluate
    checked against it (image shape, noise schedule) and against the solvers' steps (PFD's and the quantization
    ladder's) and the pipeline samplers (DDIM cannot sample a learned-variance UNet), before anything is written."""
    for run in runs.values():  # DDIMPipeline cannot sample a learned-variance UNet
        config = UNet2DModel.load_config(run.pipeline_path(variant), subfolder="unet")
        check_sampler(settings.sampler, config)
        if "sensitivity" in settings.metrics:
            check_sampler(settings.ladder_sampler, config, "ladder_sampler")
    if not {"pfd", "sensitivity"} & set(settings.metrics):
        return None
    reference, where = None, settings.pfd_reference
    if "pfd" in settings.metrics and where not in EMPIRICAL_REFERENCES:
        try:
            path = RunDirectory(where).require_pipeline(reference_variant, "pfd_reference")
        except FlatError as err:
            raise FlatError(
                f"pfd_reference {where}: neither 'empirical', 'smoothed' nor a pipeline directory with "
                f"{reference_variant} weights ({err})",
                "pfd_reference",
            ) from None
        reference = DDPMPipeline.from_pretrained(path).to(device)
    for name, run in runs.items():
        model = run.pipeline_path(variant)
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        train_steps = scheduler.config.num_train_timesteps
        if "sensitivity" in settings.metrics:  # the ladder's DDIM samples step by a fixed stride
            check_steps(settings.ladder_steps, "ddim", train_steps, "ladder_steps")
        if "pfd" in settings.metrics:
            check_steps(settings.pfd_steps, settings.pfd_solver, train_steps)
            if where == "smoothed" and training_config(run).noise_unconditional:
                raise FlatError(
                    f"pfd_reference smoothed: {name} is blind to the noise level; compare it with 'empirical' (the "
                    "noise-unconditional mixture)",
                    "pfd_reference",
                )
        if reference is None:
            continue
        config = UNet2DModel.load_config(model, subfolder="unet")
        shape, reference_shape = (
            f"{c['in_channels']}x{c['sample_size']}x{c['sample_size']}" for c in (config, reference.unet.config)
        )
        if shape != reference_shape:
            raise FlatError(
                f"pfd_reference {where}: its images are {reference_shape}, {name}'s {shape}: PFD compares models of "
                "one shape",
                "pfd_reference",
            )
        if not torch.equal(scheduler.alphas_cumprod, reference.scheduler.alphas_cumprod):
            raise FlatError(
                f"pfd_reference {where}: trained under another noise schedule than {name}", "pfd_reference"
            )
    return reference


def evaluate_runs(
    paths: Sequence[str | os.PathLike],
    variant: str,
    settings: EvaluationSettings,
    output_dir: str | os.PathLike,
    device: str = "auto",
    fid_batch_size: int | None = None,
    fid_dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    pfd_reference_variant: str = "raw",
    data_overrides: dict | None = None,
    cpu_threads: int | None = None,
) -> dict[str, EvaluationResult]:
    """Evaluate the `variant` pipeline of each run directory in `paths` and write the reports.

    Everything is checked before anything is written. Under `accelerate launch --num_processes N`, the N processes
    split the sampling and the features (gloo on the CPU); only the main process writes, and the others get {}.

    Args:
        paths: run directories of train_flat_ddpm.py.
        variant: raw, ema or swa.
        settings: what to measure.
        output_dir: where each model's report (`<output_dir>/<name>/`) and the side-by-side report go.
        device: auto (CUDA when present), cpu, cuda or cuda:N.
        fid_batch_size: images per InceptionV3 batch (default: `default_fid_batch_size(device)`).
        fid_dtype: InceptionV3's precision, float32 or bfloat16.
        cache_dir: where the real images' FID statistics are cached (default: `<output_dir>/fid_cache`).
        pfd_reference_variant: which weights of a `settings.pfd_reference` directory.
        data_overrides: DataSource fields replacing those the runs recorded (e.g. another `dataset_name`).
        cpu_threads: torch threads of each process on the CPU (default: the cores divided among the processes).

    Returns:
        Each model's result, by the name it is reported under.

    Example:
        >>> evaluate_runs(["ddpm-flat-digits"], "raw", EvaluationSettings(metrics=("lpf",)), "eval")  # doctest: +SKIP
    """
    device = resolve_device(device)
    processes = PartialState(cpu=device.type == "cpu")
    if processes.num_processes > 1:
        if device.type == "cuda" and device.index is not None:
            raise FlatError(f"device {device}: several processes take a GPU each; use auto or cuda", "device")
        device = processes.device
    if device.type == "cpu":
        share_cpu_threads(processes.num_processes, cpu_threads)
    main_process = processes.is_main_process
    runs: dict[str, RunDirectory] = {}
    for path in paths:
        run = RunDirectory(path)
        run.require_pipeline(variant, parameter="model_path")
        name = run.name + ("" if variant == "raw" else f"-{variant}")
        runs[name if name not in runs else f"{name}-{len(runs)}"] = run
    reference = load_reference(settings, runs, variant, pfd_reference_variant, device)
    out = Path(output_dir)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    fid = None
    if "fid" in settings.metrics:
        features = feature_network(settings.features, fid_dtype, settings.dinov2_model)
        fid = FID(features, batch_size=fid_batch_size, device=device, show_progress=main_process)

    classifier = load_classifier(settings.classifier, device) if settings.classifier and main_process else None
    for name, run in runs.items() if classifier is not None else ():
        config = UNet2DModel.load_config(run.pipeline_path(variant), subfolder="unet")
        shape, reads = (
            (config["in_channels"], config["sample_size"]),
            (classifier.config.num_channels, classifier.config.image_size),
        )
        if shape != reads:
            raise FlatError(
                f"classifier {settings.classifier}: it reads {reads[0]}-channel {reads[1]}x{reads[1]} images, {name} "
                f"makes {shape[0]}-channel {shape[1]}x{shape[1]} ones",
                "classifier",
            )
    real_images: dict[tuple, RealImages] = {}  # models trained on the same data share one read of it
    results: dict[str, EvaluationResult] = {}
    for name, run in runs.items():
        pipeline = DDPMPipeline.from_pretrained(run.pipeline_path(variant)).to(device)
        record = training_config(run)
        if record.noise_unconditional:  # frozen again as in training: LPF perturbs only what training moved
            make_noise_unconditional(pipeline.unet)
        source = record.data.replace(**(data_overrides or {}))
        shape = (source, pipeline.unet.config.sample_size, pipeline.unet.config.in_channels)
        if shape not in real_images:
            real_images[shape] = load_real_images(*shape)
        real = real_images[shape]
        if fid is not None and main_process:
            set_fid_reference(fid, real, settings, cache_dir or out / "fid_cache")
        against = reference.unet if reference else None
        if "pfd" in settings.metrics and settings.pfd_reference in EMPIRICAL_REFERENCES and record.noise_unconditional:
            # a model trained blind to the noise level is compared with the empirical denoiser blind to it too
            against = empirical_reference(real, pipeline.scheduler, device, noise_unconditional=True)
        evaluation = evaluate(pipeline.unet, pipeline.scheduler, real, settings, fid, processes, against, classifier)
        if not main_process:
            continue
        evaluation.result.update(model=name, path=str(run.pipeline_path(variant)), variant=variant)
        results[name] = evaluation.result
        write_model_report(name, evaluation, settings, real, out / name)
        # The run directory keeps its latest evaluation beside the weights, for its model card, the Hub and the Space
        # (the caller refreshes the card: `hub.model_card.write_model_card`).
        run.publish_evaluation(variant, out / name)
    if main_process:
        write_comparison(results, settings, out)
    return results
