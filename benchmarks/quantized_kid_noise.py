"""How many samples quantized KID needs: the sampling noise of ΔKID (KID at quantized weights minus KID at fp32, from
the same noises) at fixed weights, by bootstrap over the samples, at several sample counts, and what each count costs.

    python benchmarks/quantized_kid_noise.py --output_dir outputs/kid-noise            # the shipped flat/sharp pair
    python benchmarks/quantized_kid_noise.py --output_dir outputs/kid-noise --pool 5000  # later: grow the pool

Each model's fp32 and quantized pipeline (the level, DDIMPipeline with eta 0 by default) draw the same `--pool`
noises; their InceptionV3 features, and those of `--num_real` Fashion-MNIST test images, are kept in `--output_dir`
in chunks, so that a run stopped early resumes and a larger pool reuses what was drawn. ΔKID is the unbiased MMD^2
with KID's kernel (x.y / 2048 + 1)^3 over all the samples and the real images (the real-real term cancels in the
difference); a bootstrap draw resamples the noise indices with replacement, fp32 and quantized together (they are
paired). A count larger than the pool is not measured.

The rule, fixed before the run: the recommended count is the smallest whose bootstrap standard deviation of ΔKID is
below a quarter of the across-seed spread of ΔKID in the Fashion-MNIST study (the pooled standard deviation over its
6 seeds of the ADM and SAM rho 0.01 rows, raw, 5-bit per tensor, T'=20, 500 samples; from its committed report),
for every model benchmarked. Prints a table and writes `kid_noise.json` beside the features.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline

from diffusers_flat.data import fashion_mnist
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.settings import quantization_level
from diffusers_flat.metrics.fid import feature_network, nhwc_to_nchw
from diffusers_flat.quantization import quantize_weights_
from diffusers_flat.run_directory import DataSource, write_json
from diffusers_flat.sampling import sample_images

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [
    REPO / "spaces_app" / "models" / name for name in ("fashion-mnist-adm-seed1", "fashion-mnist-sam-rho0.01-seed1")
]
STUDY = REPO / "docs" / "study-fashion-mnist" / "report.json"
CHUNK = 250


def across_seed_spread() -> float:
    """The pooled across-seed standard deviation of ΔKID x10^3 in the Fashion-MNIST study (ADM, SAM rho 0.01)."""
    results = json.loads(STUDY.read_text())["results"]
    variances = []
    for row in ("ADM", "+SAM-rho0.01"):
        deltas = [
            1e3 * (r["quantization"]["kid"]["5"]["20"]["mean"] - r["kid"]["20"]["mean"]) for r in results[row].values()
        ]
        variances.append(np.var(deltas, ddof=1))
    return float(np.sqrt(np.mean(variances)))


def cached_features(path: Path, count: int, compute) -> tuple[np.ndarray, float]:
    """Features of items 0..count-1, computed `CHUNK` at a time by `compute(first, n)` and kept as .npy files; returns
    them and the seconds spent computing the chunks that were missing."""
    path.mkdir(parents=True, exist_ok=True)
    chunks, seconds = [], 0.0
    for first in range(0, count, CHUNK):
        n = min(CHUNK, count - first)
        file = path / f"{first:06d}-{n}.npy"
        if not file.is_file():
            start = time.perf_counter()
            np.save(file, compute(first, n))
            seconds += time.perf_counter() - start
        chunks.append(np.load(file))
    return np.concatenate(chunks), seconds


def kid_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3


def delta_kid(k_qq, k_ff, k_qr, k_fr, index: np.ndarray) -> float:
    """ΔKID x10^3 of the samples `index` (with repeats): the unbiased MMD^2 of the quantized samples less that of the
    fp32 ones, against the same real images (whose own term cancels)."""
    n = len(index)

    def within(k):
        block = k[np.ix_(index, index)]
        return (block.sum() - np.trace(block)) / (n * (n - 1))

    return float(1e3 * (within(k_qq) - within(k_ff) - 2 * (k_qr[index].mean() - k_fr[index].mean())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", nargs="+", default=[str(p) for p in SHIPPED])
    parser.add_argument("--output_dir", required=True, help="Where the features and kid_noise.json are kept.")
    parser.add_argument("--level", default="4:per_channel", help="The quantized level, B:granularity.")
    parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pool", type=int, default=2000, help="Samples per model and precision.")
    parser.add_argument("--num_real", type=int, default=2000, help="Test images KID compares with.")
    parser.add_argument("--counts", nargs="+", type=int, default=[500, 1000, 2000, 5000])
    parser.add_argument("--bootstrap", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bits, granularity = quantization_level(args.level)
    out = Path(args.output_dir)
    inception = feature_network("inception").eval()

    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([inception(nhwc_to_nchw(images[i : i + 32])) for i in range(0, len(images), 32)]).numpy()

    real = load_real_images(DataSource(dataset_name=fashion_mnist.NAME), 16, 1).held_out
    chosen = np.sort(np.random.default_rng(args.seed).permutation(len(real))[: args.num_real])
    real_features, real_seconds = cached_features(
        out / "real", args.num_real, lambda f, n: features(real[chosen[f : f + n]])
    )
    spread = across_seed_spread()
    threshold = spread / 4
    print(f"across-seed spread of ΔKID x10³ in the Fashion-MNIST study: {spread:.2f}; a quarter: {threshold:.2f}")
    print(
        f"{args.level}, {args.sampler} {args.steps} steps, pool {args.pool} per precision, {args.num_real} test images"
    )
    report = {"level": args.level, "sampler": args.sampler, "steps": args.steps, "pool": args.pool}
    report |= {"num_real": args.num_real, "spread": spread, "threshold": threshold, "models": {}}
    rng = np.random.default_rng(args.seed)
    for path in args.model_path:
        pipeline = DDPMPipeline.from_pretrained(path)
        unet = pipeline.unet.eval()
        quantized = copy.deepcopy(unet)
        quantize_weights_(quantized, bits, granularity)
        timing = {"sampling": 0.0, "features": 0.0, "images": 0}
        pools = {}
        for arm, network in (("fp32", unet), (args.level.replace(":", "-"), quantized)):

            def compute(
                first: int, n: int, network=network, scheduler=pipeline.scheduler, timing=timing
            ) -> np.ndarray:
                start = time.perf_counter()
                images = sample_images(network, scheduler, n, args.steps, args.seed, 250, False, first, args.sampler)
                middle = time.perf_counter()
                feats = features(images)
                timing["sampling"] += middle - start
                timing["features"] += time.perf_counter() - middle
                timing["images"] += n
                return feats

            pools[arm], _ = cached_features(out / Path(path).name / arm, args.pool, compute)
        fp32, q = pools.values()
        k_ff, k_qq = kid_kernel(fp32, fp32), kid_kernel(q, q)
        k_fr, k_qr = kid_kernel(fp32, real_features).mean(1), kid_kernel(q, real_features).mean(1)
        full = delta_kid(k_qq, k_ff, k_qr, k_fr, np.arange(args.pool))
        per_image = (timing["sampling"] + timing["features"]) / timing["images"] if timing["images"] else None
        rows = {}
        for count in args.counts:
            if count > args.pool:
                rows[str(count)] = {"measured": False}
                continue
            draws = [
                delta_kid(k_qq, k_ff, k_qr, k_fr, rng.integers(0, args.pool, count)) for _ in range(args.bootstrap)
            ]
            rows[str(count)] = {"measured": True, "sd": float(np.std(draws, ddof=1)), "mean": float(np.mean(draws))}
        name = Path(path).name
        report["models"][name] = {"delta_kid": full, "counts": rows, "seconds_per_image": per_image}
        print(f"\n{name}: ΔKID x10³ over the whole pool {full:+.2f}")
        print("samples | bootstrap sd of ΔKID x10³ | below a quarter of the spread | cost (2 precisions)")
        for count, row in rows.items():
            cost = "-" if per_image is None else f"{2 * int(count) * per_image / 60:.1f} min"
            if row["measured"]:
                print(f"{count} | {row['sd']:.2f} | {'yes' if row['sd'] < threshold else 'no'} | {cost}")
            else:
                print(f"{count} | not measured (pool {args.pool}) | - | {cost}")
        if per_image is not None:
            sampling, feats = (timing[k] / timing["images"] for k in ("sampling", "features"))
            print(f"measured here: sampling {sampling:.3f} s/image, InceptionV3 {feats:.3f} s/image")
    if real_seconds:
        print(f"the {args.num_real} test images' features: {real_seconds / 60:.1f} min (once)")
    below = [
        int(c)
        for c in map(str, sorted(args.counts))
        if all(m["counts"][c].get("measured") and m["counts"][c]["sd"] < threshold for m in report["models"].values())
    ]
    report["recommended"] = below[0] if below else None
    print(
        f"\nrecommended: {below[0]} samples" if below else "\nno measured count is below the threshold for every model"
    )
    write_json(out / "kid_noise.json", report)


if __name__ == "__main__":
    main()
