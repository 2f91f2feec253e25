"""Evaluation costs and FID agreement, measured in one run, on the CPU or a GPU.

    python benchmarks/evaluation.py --model_path ddpm-flat-digits [--device cuda] [--bf16] [--skip_full]

Prints: InceptionV3 feature throughput (images/s) of the TorchScript file as it is (the reference path) and of
`InceptionFeatures` (its weights folded, channels-last), side by side in one run, with the FID and KID of each on the
same two image sets (they must agree: FID to 1e-3 relative, KID to 1e-4); our FID against a reference computation
(numpy/scipy on the same features; 1e-3 relative); with --bf16, the bfloat16 network's
throughput and its FID deviation; sampling throughput at T' = 20 and 100 of the model and of a freshly initialised
`--protocol_preset` (the paper's CIFAR-10 ADM by default), with the projected time of the paper's protocol for one
model (50,000 samples at T' = 20 and 100, fp32 and 8-bit, and their features); and the wall time of evaluate_flat.py's
full default evaluation of the model (target <= 15 min on the CPU).
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
from diffusers import DDPMPipeline, DDPMScheduler
from scipy import linalg
from sklearn.datasets import load_digits

from diffusers_flat.evaluation.evaluate import resolve_device
from diffusers_flat.metrics.fid import (
    FID,
    InceptionFeatures,
    default_fid_batch_size,
    nhwc_to_nchw,
)
from diffusers_flat.sampling import sample_images
from diffusers_flat.training.models import build_unet

PROTOCOL_SAMPLES = 50_000


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The classic formula (pytorch-fid / TTUR): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) in float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def features_per_second(features, images: np.ndarray, batch_size: int, device: torch.device) -> tuple[float, list]:
    """Throughput of `features` (a callable on uint8 NCHW batches on `device`) and what it returned."""
    features(nhwc_to_nchw(images[:2]).to(device))  # warm-up
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        batches = [nhwc_to_nchw(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        out = [features(batch.to(device)) for batch in batches]
    synchronize(device)
    return len(images) / (time.perf_counter() - start), out


def sampling_rates(unet, scheduler, device: torch.device, batch_size: int) -> dict[int, float]:
    rates = {}
    for steps in (20, 100):
        sample_images(unet, scheduler, 2, 2, batch_size=2, show_progress=False)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        sample_images(unet, scheduler, batch_size, steps, batch_size=batch_size, show_progress=False)
        synchronize(device)
        rates[steps] = batch_size / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default="ddpm-flat-digits")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--num_images", type=int, default=200, help="Images per set for the FID agreement check.")
    parser.add_argument("--fid_batch_size", type=int, default=None, help="Default: 200 on a GPU, 32 on the CPU.")
    parser.add_argument("--batch_size", type=int, default=250, help="Images per UNet batch when sampling.")
    parser.add_argument("--bf16", action="store_true", help="Also measure the bfloat16 InceptionV3.")
    parser.add_argument("--protocol_preset", default="adm-cifar10", help="UNet preset of the protocol projection.")
    parser.add_argument("--protocol_resolution", type=int, default=32)
    parser.add_argument("--skip_full", action="store_true", help="Skip the full evaluation timing.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    fid_batch = args.fid_batch_size or default_fid_batch_size(device)
    where = f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    print(f"device: {where}; {torch.get_num_threads()} CPU threads; InceptionV3 batches of {fid_batch}")

    digits = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    real = np.repeat(np.repeat(digits, 2, axis=1), 2, axis=2)[: args.num_images, ..., None]
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 40, real.shape), 0, 255).astype(np.uint8)

    # the reference path (the TorchScript file as it is) and ours (its weights folded), on the same images
    reference_features = InceptionFeatures(folded=False).to(device)
    features = InceptionFeatures().to(device)
    both = np.concatenate([real, noisy])
    old, _ = features_per_second(reference_features, both, fid_batch, device)
    ours, feats = features_per_second(features, both, fid_batch, device)
    print(
        f"InceptionV3 features: {old:.2f} images/s as the TorchScript file runs, {ours:.2f} images/s folded and "
        f"channels-last: {ours / old:.2f}x"
    )
    feats = torch.cat(feats).double().cpu().numpy()
    a, b = feats[: len(real)], feats[len(real) :]
    scores = {}
    for name, network in (("TorchScript", reference_features), ("folded", features)):
        fid = FID(network, batch_size=fid_batch, show_progress=False, device=device)
        fid.set_real(real)
        scores[name] = fid.scores(noisy)
    score, kid = scores["folded"]["fid"], scores["folded"]["kid"]["mean"]
    old_score, old_kid = scores["TorchScript"]["fid"], scores["TorchScript"]["kid"]["mean"]
    print(
        f"FID folded {score:.4f} vs TorchScript {old_score:.4f}: relative difference "
        f"{abs(score - old_score) / old_score:.2e} (must be <= 1e-3); KID {kid:.6f} vs {old_kid:.6f}: difference "
        f"{abs(kid - old_kid):.2e} (must be <= 1e-4)"
    )
    reference = reference_fid(a, b)
    print(
        f"FID ours (torchmetrics statistics): {score:.4f}; reference (numpy/scipy sqrtm): {reference:.4f}; "
        f"relative difference {abs(score - reference) / reference:.2e} (must be <= 1e-3)"
    )
    if args.bf16:
        bf16 = InceptionFeatures(dtype="bfloat16").to(device)
        rate, _ = features_per_second(bf16, np.concatenate([real, noisy]), fid_batch, device)
        low = FID(bf16, batch_size=fid_batch, show_progress=False, device=device)
        low.set_real(real)
        bf16_score = low.score(noisy)
        print(
            f"bfloat16 InceptionV3: {rate:.1f} images/s ({rate / ours:.2f}x float32); FID {bf16_score:.4f} vs "
            f"{score:.4f}: relative deviation {abs(bf16_score - score) / score:.2e}"
        )

    pipeline = DDPMPipeline.from_pretrained(args.model_path).to(device)
    rates = sampling_rates(pipeline.unet, pipeline.scheduler, device, args.batch_size)
    print(f"sampling {args.model_path}: " + ", ".join(f"T'={s}: {r:.1f} images/s" for s, r in rates.items()))

    unet = build_unet(args.protocol_preset, args.protocol_resolution, 3, learn_sigma=True).to(device)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    # On the CPU a few images give the rate: a full batch of the 52M-parameter ADM at T' = 100 would take an hour.
    preset_rates = sampling_rates(unet, scheduler, device, args.batch_size if device.type == "cuda" else 4)
    sampling_hours = 2 * sum(PROTOCOL_SAMPLES / r for r in preset_rates.values()) / 3600  # fp32 and 8-bit
    feature_hours = (4 + 1) * PROTOCOL_SAMPLES / ours / 3600  # four generated sets and the real one
    print(
        f"sampling a fresh {args.protocol_preset} at {args.protocol_resolution}x{args.protocol_resolution}: "
        + ", ".join(f"T'={s}: {r:.1f} images/s" for s, r in preset_rates.items())
    )
    print(
        f"projected paper protocol for one {args.protocol_preset} model on {where} (50,000 samples at T' = 20 and "
        f"100, fp32 and 8-bit, and their features): {sampling_hours:.1f} h sampling + {feature_hours:.1f} h "
        f"InceptionV3 = {sampling_hours + feature_hours:.1f} h"
    )

    if not args.skip_full:
        # The command as a user runs it, in a process of its own (nothing else runs beside it).
        script = Path(__file__).resolve().parents[1] / "training_scripts" / "evaluate_flat.py"
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            command = [sys.executable, str(script), "--model_path", args.model_path, "--output_dir", out]
            subprocess.run([*command, "--device", args.device], check=True, stdout=subprocess.DEVNULL)
            minutes = (time.perf_counter() - start) / 60
        print(
            f"full default evaluation of {args.model_path}: {minutes:.1f} min (target <= 15 on the CPU), real-image "
            "statistics computed from scratch"
        )


if __name__ == "__main__":
    main()
