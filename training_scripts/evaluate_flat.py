"""Evaluate trained DDPM pipelines: FID at few and many steps, LPF, loss under perturbation, the loss surface,
exposure bias, memorization and FID under weight quantization, per model and side by side.

    python training_scripts/evaluate_flat.py --model_path ddpm-flat-digits [more dirs] --output_dir eval [--quantize 8]

Each model's results and plots are also copied into its pipeline dir (`evaluation/`) and its model card refreshed.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline

from diffusers_flat.checkpointing import write_json
from diffusers_flat.cli import OneLineArgumentParser, UsageError, run_main
from diffusers_flat.data import DataError, ImageTransform, load_image_dataset, open_image
from diffusers_flat.exposure_bias import exposure_bias
from diffusers_flat.fid import FID, MIN_FID_IMAGES, FIDError, real_statistics_cached
from diffusers_flat.flatness import DiffusionLoss, loss_surface, loss_under_perturbation, lpf_flatness
from diffusers_flat.memorization import memorization_ratio
from diffusers_flat.model_card import ModelCardError, write_model_card
from diffusers_flat.plots import (
    plot_exposure_bias,
    plot_fid_vs_bits,
    plot_loss_surfaces,
    plot_nearest_neighbours,
    plot_perturbation_curves,
)
from diffusers_flat.quantization import GRANULARITIES, quantize_weights_
from diffusers_flat.sampling import image_grid, sample_images
from diffusers_flat.tables import quantization_table, results_table

METRICS = ("fid", "lpf", "perturbation", "surface", "exposure_bias", "memorization")
VARIANTS = {"raw": "", "ema": "ema", "swa": "swa"}
logger = logging.getLogger("evaluate_flat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", nargs="+", required=True, help="Output dirs of train_flat_ddpm.py.")
    parser.add_argument("--variant", default="raw", help="raw, ema or swa: which weights of each model.")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), help=f"Any of: {', '.join(METRICS)}.")
    parser.add_argument("--inference_steps", nargs="+", type=int, default=[20, 100], help="FID columns T'.")
    parser.add_argument("--num_samples", type=int, default=1000, help="Generated images per FID column.")
    parser.add_argument("--num_real", type=int, default=1000, help="At most this many real images for FID.")
    parser.add_argument("--quantize", nargs="+", type=int, default=[],
                        help="Also FID with weights quantized to these bits (2-8; the paper: 8), as in Table 4.")
    parser.add_argument("--quantize_granularity", default="per_tensor", help="per_tensor or per_channel scales.")
    parser.add_argument("--output_dir", default="eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=250, help="Images per UNet batch.")
    parser.add_argument("--fid_batch_size", type=int, default=50, help="Images per InceptionV3 batch.")
    parser.add_argument("--loss_samples", type=int, default=256, help="(x0, t, eps) triples of the fixed loss.")
    parser.add_argument("--lpf_sigma", type=float, default=0.01)
    parser.add_argument("--lpf_draws", type=int, default=20, help="K, the Monte Carlo draws of LPF.")
    parser.add_argument("--gammas", nargs="+", type=float, default=[0, 10, 20, 30, 40, 50])
    parser.add_argument("--directions", type=int, default=3, help="Random directions of the perturbation curve.")
    parser.add_argument("--surface_extent", type=float, default=0.5)
    parser.add_argument("--surface_resolution", type=int, default=9)
    parser.add_argument("--exposure_samples", type=int, default=128)
    parser.add_argument("--cache_dir", default=None, help="Where real-image FID statistics are cached.")
    # Overrides of the dataset recorded in training_args.json
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--image_column", default=None)
    args = parser.parse_args(argv)
    args.metrics = list(dict.fromkeys(args.metrics))
    return args


def check_args(args: argparse.Namespace) -> None:
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"--metrics: unknown {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if args.variant not in VARIANTS:
        raise UsageError(f"--variant {args.variant!r}: choose raw, ema or swa")
    if "fid" in args.metrics and args.num_samples < MIN_FID_IMAGES:
        raise UsageError(
            f"--num_samples {args.num_samples} is too few for a meaningful FID: use at least {MIN_FID_IMAGES} "
            "(the paper uses 50,000)"
        )
    if any(s < 1 for s in args.inference_steps):
        raise UsageError(f"--inference_steps must be >= 1, got {args.inference_steps}")
    if any(not 2 <= b <= 8 for b in args.quantize):
        raise UsageError(f"--quantize: bits must be from 2 to 8 (the paper: 8), got {args.quantize}")
    if args.quantize and "fid" not in args.metrics:
        raise UsageError("--quantize reports FID before -> after quantization: add fid to --metrics")
    if args.quantize_granularity not in GRANULARITIES:
        raise UsageError(f"--quantize_granularity {args.quantize_granularity!r}: choose {' or '.join(GRANULARITIES)}")


def pipeline_dir(model_path: str, variant: str) -> Path:
    root = Path(model_path)
    if not (root / "model_index.json").is_file() or not (root / "unet").is_dir():
        raise UsageError(f"--model_path {model_path}: not a DDPMPipeline directory (no model_index.json and unet/)")
    directory = root / VARIANTS[variant]
    if not (directory / "model_index.json").is_file():
        raise UsageError(f"--variant {variant}: {model_path} was trained without --use_{variant} (no {directory})")
    return directory


def training_images(args: argparse.Namespace, training_args: dict, resolution: int, channels: int):
    """All training images as the model saw them (centre crop, no flip): uint8 NHWC, [-1, 1] NCHW, and what
    identifies them for the FID cache."""
    sources = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column")
    source = tuple(getattr(args, k) or training_args.get(k) for k in sources)
    return _load_training_images(*source, resolution, channels)


@functools.lru_cache(maxsize=2)  # models trained on the same data share one read of it
def _load_training_images(dataset_name, dataset_config_name, train_data_dir, image_column, resolution, channels):
    column = image_column or "image"
    dataset, _ = load_image_dataset(dataset_name, dataset_config_name, train_data_dir, column)
    transform = ImageTransform(resolution, center_crop=True, channels=channels)
    tensors = torch.stack([transform(open_image(record), random.Random(0)) for record in dataset[column]])
    uint8 = ((tensors + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    source = {"dataset_name": dataset_name, "dataset_config_name": dataset_config_name,
              "train_data_dir": train_data_dir, "image_column": image_column}  # fmt: skip
    key = {"dataset": dataset._fingerprint, "source": source, "resolution": resolution, "channels": channels}
    return uint8, tensors, key


def evaluate_model(name: str, directory: Path, args: argparse.Namespace, fid: FID | None, out: Path) -> dict:
    pipeline = DDPMPipeline.from_pretrained(directory)
    unet, scheduler = pipeline.unet.eval(), pipeline.scheduler
    # ema/ and swa/ read the training arguments saved beside them, one level up.
    candidates = [d / "training_args.json" for d in (directory, directory.parent)]
    saved = next((path for path in candidates if path.is_file()), None)
    training_args = json.loads(saved.read_text()) if saved else {}
    resolution, channels = unet.config.sample_size, unet.config.in_channels
    real_uint8, real_tensors, key = training_images(args, training_args, resolution, channels)
    # A fixed random subset of the training images, the same for every model, serves FID and the losses.
    order = np.random.default_rng(args.seed).permutation(len(real_uint8))
    real_tensors = real_tensors[torch.from_numpy(order)]
    results: dict = {"model": name, "path": str(directory), "variant": args.variant}
    model_out = out / name
    model_out.mkdir(parents=True, exist_ok=True)

    samples = {}
    if "fid" in args.metrics or "memorization" in args.metrics:
        for steps in args.inference_steps if "fid" in args.metrics else [max(args.inference_steps)]:
            start = time.perf_counter()
            samples[steps] = sample_images(unet, scheduler, args.num_samples, steps, seed=args.seed,
                                           batch_size=args.batch_size)  # fmt: skip
            results.setdefault("sampling_seconds", {})[str(steps)] = round(time.perf_counter() - start, 2)
            image_grid(samples[steps][:64]).save(model_out / f"samples_{steps}_steps.png")
    if "fid" in args.metrics:
        fid_real = real_uint8[np.sort(order[: args.num_real])]
        real_statistics_cached(fid, fid_real, args.cache_dir or out / "fid_cache", {**key, "n": len(fid_real)})
        results["fid"] = {str(steps): fid.score(images) for steps, images in samples.items()}
        results["fid_num_generated"] = args.num_samples
        results["fid_num_real"] = fid.num_real
    if args.quantize:
        results["quantization"] = {"granularity": args.quantize_granularity, "fid": {}}
        for bits in args.quantize:
            quantized = copy.deepcopy(unet)
            quantize_weights_(quantized, bits, args.quantize_granularity)
            fids = results["quantization"]["fid"][str(bits)] = {}
            for steps in args.inference_steps:
                images = sample_images(quantized, scheduler, args.num_samples, steps, seed=args.seed,
                                       batch_size=args.batch_size)  # fmt: skip
                image_grid(images[:64]).save(model_out / f"samples_{steps}_steps_{bits}bit.png")
                fids[str(steps)] = fid.score(images)
        plot_fid_vs_bits({name: results}, model_out / "fid_vs_bits.png")
    if {"lpf", "perturbation", "surface"} & set(args.metrics):
        count = min(args.loss_samples, len(real_tensors))
        loss = DiffusionLoss(scheduler, real_tensors[:count], seed=args.seed, batch_size=args.batch_size)
        results["loss"] = loss(unet)
        if "lpf" in args.metrics:
            results["lpf"] = lpf_flatness(unet, loss, sigma=args.lpf_sigma, num_draws=args.lpf_draws, seed=args.seed)
        if "perturbation" in args.metrics:
            results["perturbation"] = loss_under_perturbation(unet, loss, args.gammas, args.directions, args.seed)
            plot_perturbation_curves({name: results["perturbation"]}, model_out / "perturbation.png")
        if "surface" in args.metrics:
            results["surface"] = loss_surface(unet, loss, args.surface_extent, args.surface_resolution, args.seed)
    if "exposure_bias" in args.metrics:
        count = min(args.exposure_samples, len(real_tensors))
        results["exposure_bias"] = exposure_bias(unet, scheduler, real_tensors[:count], max(args.inference_steps),
                                                 seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    if "memorization" in args.metrics:
        generated = samples[max(samples)]
        memo = memorization_ratio(generated, real_uint8)
        plot_nearest_neighbours(generated, real_uint8, memo["nearest"], model_out / "memorization.png")
        results["memorization"] = {k: memo[k] for k in ("memorization_ratio", "num_generated", "num_training",
                                                        "threshold")}  # fmt: skip
    write_json(model_out / "eval_results.json", results)
    (model_out / "results.md").write_text(markdown_report({name: results}, args.inference_steps))
    # The pipeline dir keeps its latest evaluation beside the weights, for its model card, the Hub and the Space.
    staged = directory / "evaluation.partial"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(model_out, staged)
    shutil.rmtree(directory / "evaluation", ignore_errors=True)
    staged.rename(directory / "evaluation")
    write_model_card(directory.parent if args.variant != "raw" else directory)
    return results


def markdown_report(results: dict[str, dict], steps: list[int]) -> str:
    table4 = quantization_table(results)
    return results_table(results, steps) + (f"\n{table4}" if table4 else "")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    directories = {}
    for path in args.model_path:
        directory = pipeline_dir(path, args.variant)
        name = Path(path).resolve().name + ("" if args.variant == "raw" else f"-{args.variant}")
        directories[name if name not in directories else f"{name}-{len(directories)}"] = directory
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fid = FID(batch_size=args.fid_batch_size) if "fid" in args.metrics else None

    results = {name: evaluate_model(name, directory, args, fid, out) for name, directory in directories.items()}

    write_json(out / "eval_results.json", results)
    (out / "results.md").write_text(markdown_report(results, args.inference_steps))
    if "perturbation" in args.metrics:
        plot_perturbation_curves({n: r["perturbation"] for n, r in results.items()}, out / "perturbation.png")
    if "surface" in args.metrics:
        plot_loss_surfaces({n: r["surface"] for n, r in results.items()}, out / "loss_surface.png")
    if "exposure_bias" in args.metrics:
        plot_exposure_bias({n: r["exposure_bias"] for n, r in results.items()}, out / "exposure_bias.png")
    if args.quantize:
        plot_fid_vs_bits(results, out / "fid_vs_bits.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_main(main, parse_args(), (UsageError, DataError, FIDError, ModelCardError))
