"""Evaluation costs and FID agreement, measured in one run.

    python benchmarks/evaluation.py --model_path ddpm-flat-digits [--skip_full]

Prints: InceptionV3 feature throughput (images/s); our FID against a reference computation (numpy/scipy on the same
network's features of the same two image sets; they must agree to 1e-3 relative); sampling throughput at T' = 20
and 100; and the wall time of evaluate_flat.py's full default evaluation of the model (FID at 20 and 100 steps from
1,000 samples each, LPF, loss under perturbation, loss surface, exposure bias, memorization; target <= 15 min).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline
from scipy import linalg
from sklearn.datasets import load_digits

from diffusers_flat.fid import FID, InceptionFeatures, nhwc_to_nchw
from diffusers_flat.sampling import sample_images


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The classic formula (pytorch-fid / TTUR): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="ddpm-flat-digits")
    parser.add_argument("--num_images", type=int, default=200, help="Images per set for the FID agreement check.")
    parser.add_argument("--skip_full", action="store_true", help="Skip the full evaluation timing.")
    args = parser.parse_args()

    digits = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    real = np.repeat(np.repeat(digits, 2, axis=1), 2, axis=2)[: args.num_images, ..., None]
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 40, real.shape), 0, 255).astype(np.uint8)

    features = InceptionFeatures()
    features(nhwc_to_nchw(real[:2]))  # warm-up
    start = time.perf_counter()
    with torch.no_grad():
        feats = [
            torch.cat([features(nhwc_to_nchw(x[i : i + 50])) for i in range(0, len(x), 50)]) for x in (real, noisy)
        ]
    seconds = time.perf_counter() - start
    print(
        f"InceptionV3 features: {2 * len(real) / seconds:.1f} images/s ({2 * len(real)} images of 16x16, "
        f"{torch.get_num_threads()} threads)"
    )

    fid = FID(features, show_progress=False)
    fid.set_real(real)
    ours = fid.score(noisy)
    reference = reference_fid(feats[0].double().numpy(), feats[1].double().numpy())
    print(
        f"FID ours (torchmetrics statistics): {ours:.4f}; reference (numpy/scipy sqrtm): {reference:.4f}; "
        f"relative difference {abs(ours - reference) / reference:.2e} (must be <= 1e-3)"
    )

    pipeline = DDPMPipeline.from_pretrained(args.model_path)
    for steps in (20, 100):
        start = time.perf_counter()
        sample_images(pipeline.unet, pipeline.scheduler, 250, steps, batch_size=250, show_progress=False)
        seconds = time.perf_counter() - start
        print(f"sampling at T'={steps}: {250 / seconds:.1f} images/s (batch 250)")

    if not args.skip_full:
        # The command as a user runs it, in a process of its own (nothing else runs beside it).
        script = Path(__file__).resolve().parents[1] / "training_scripts" / "evaluate_flat.py"
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, str(script), "--model_path", args.model_path, "--output_dir", out],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            minutes = (time.perf_counter() - start) / 60
        print(
            f"full default evaluation of {args.model_path}: {minutes:.1f} min (target <= 15), real-image "
            "statistics computed from scratch"
        )


if __name__ == "__main__":
    main()
