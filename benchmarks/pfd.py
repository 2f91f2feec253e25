"""PFD and the empirical denoiser, measured in one run on the CPU or a GPU.

    python benchmarks/pfd.py --model_path ddpm-flat-digits [--device cuda] [--noises 1000] [--steps 50]

Prints: the empirical denoiser's throughput (images x training images per second) on the model's training set
against a naive reference written here (the full batch x N distance matrix in one piece, then a softmax), their ratio
and their largest difference (must be <= 1e-5); and the wall time of PFD between the model and the empirical
denoiser of its training set (E_mem) on --noises shared noises with --steps DDIM steps, with its value.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMPipeline
from evaluation import synchronize  # benchmarks/evaluation.py

from diffusers_flat.evaluation.evaluate import resolve_device
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser
from diffusers_flat.metrics.pfd import pfd
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.training.config import training_config


def naive_epsilon(images: torch.Tensor, abar: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """The same closed form the obvious way: every ||x - a mu_j||^2 at once (batch x N x D in memory), a softmax."""
    a, v = abar[t].sqrt(), 1 - abar[t]
    flat = x.flatten(1).double()
    distances = ((flat[:, None, :] - a * images.double()[None]) ** 2).sum(-1)
    weights = torch.softmax(-distances / (2 * v), dim=1)
    return ((flat - a * weights @ images.double()) / v.sqrt()).reshape(x.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="ddpm-flat-digits")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--noises", type=int, default=1000, help="Shared noises of the PFD timing.")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the PFD timing.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per denoiser call in the throughput test.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    run = RunDirectory(args.model_path)
    pipeline = DDPMPipeline.from_pretrained(run.require_pipeline("raw", "model_path")).to(device)
    unet, scheduler = pipeline.unet, pipeline.scheduler
    real = load_real_images(training_config(run).data, unet.config.sample_size, unet.config.in_channels)
    empirical = EmpiricalDenoiser.from_training_set(real.tensors, scheduler).to(device)
    n = len(real.tensors)
    print(f"device: {device}; {n} training images of {tuple(real.tensors.shape[1:])}")

    x = torch.randn(args.batch_size, *real.tensors.shape[1:], generator=torch.Generator().manual_seed(0)).to(device)
    images, abar = empirical.images, empirical.alphas_cumprod
    rates, outputs = {}, {}
    for name, call in (
        ("chunked", lambda t: empirical(x, t).sample.double()),
        ("naive", lambda t: naive_epsilon(images, abar, x, t)),
    ):
        call(500)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        outputs[name] = [call(t) for t in (999, 500, 100, 10)]
        synchronize(device)
        rates[name] = 4 * args.batch_size * n / (time.perf_counter() - start)
    difference = max((a - b).abs().max().item() for a, b in zip(outputs["chunked"], outputs["naive"]))
    print(
        f"empirical denoiser: {rates['chunked']:.3g} image x training-image pairs/s; naive full matrix "
        f"{rates['naive']:.3g}/s: {rates['chunked'] / rates['naive']:.2f}x; largest difference {difference:.2e} "
        "(must be <= 1e-5)"
    )

    synchronize(device)
    start = time.perf_counter()
    result = pfd(unet, empirical, scheduler.config, args.noises, args.steps, batch_size=250)
    synchronize(device)
    print(
        f"PFD({args.model_path}, empirical) = {result['pfd']:.4f} ± {result['stderr']:.4f} on {args.noises} noises, "
        f"{args.steps} DDIM steps: {time.perf_counter() - start:.1f} s"
    )
    mine, reference = result["outside"]
    print(f"RMS distance of the flows from [-1, 1] (unclamped): the model {mine:.4f}, the empirical {reference:.4f}")


if __name__ == "__main__":
    main()
