"""fp32 vs quantized samples of DDPMs trained with diffusers-flat: one model's fp32 and quantized samples from the same
seed (first tab), and every served model side by side at one precision from the same noises (second tab: a flat and
a sharp model, the paper's Figures 2 and 4).

    python spaces_app/app.py                                  # the models shipped in spaces_app/models
    FLAT_MODELS=ddpm-flat-digits python spaces_app/app.py     # or your own

FLAT_MODELS lists Hub repo ids or local pipeline dirs, comma-separated; by default the flat and the sharp model
shipped in spaces_app/models. Gradio's own GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT choose where it listens. Only safetensors weights are read, and no remote code is run. The UNets
run on the GPU when there is one (a GPU Space), else on the CPU.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import snapshot_download

from diffusers_flat.metrics.quantization_sensitivity import ddim_images
from diffusers_flat.quantization import GRANULARITIES, quantize_for_deployment, quantize_weights_
from diffusers_flat.run_directory import RunDirectory, hub_download_patterns
from diffusers_flat.sampling import image_grid, sample_images, to_uint8

# The default: the flat and the sharp model shipped beside the app (the Fashion-MNIST study's ADM and SAM, one seed).
SHIPPED = sorted(str(p) for p in (Path(__file__).parent / "models").glob("*") if (p / "model_index.json").is_file())
MODELS = [m.strip() for m in os.environ.get("FLAT_MODELS", ",".join(SHIPPED)).split(",") if m.strip()]
PRECISIONS = {
    "8-bit": "8-bit: real int8 weights (torchao int8 tensors on every Conv2d and Linear, per output channel)",
    "4-bit": "4-bit: direct quantization of every Conv2d/Linear weight, one scale per tensor",
}
LEVELS = {"8-bit": "8-bit per_channel", "4-bit": "4-bit per_tensor"}  # the first tab's precisions
BITS = (3, 8)  # the second tab's slider
INT8 = "8-bit per_channel"  # the level the real int8 path computes
STEPS = (20, 100)
MAX_SEED = 2**32 - 1
MAX_IMAGES = 16
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLOTS = {"fid_vs_bits.png": "FID against weight bits", "perturbation.png": "Loss under random weight perturbation"}


@functools.lru_cache(maxsize=8)
def model_dir(name: str) -> RunDirectory:
    """A local run dir as given, else the Hub repo's configs, safetensors weights and evaluation plots (never pickles
    or code), downloaded once."""
    if Path(name).is_dir():
        return RunDirectory(name)
    return RunDirectory(snapshot_download(name, allow_patterns=hub_download_patterns()))


LOADED: OrderedDict[tuple[str, str], UNet2DModel] = OrderedDict()  # (model, precision) -> UNet, newest last
LOADING = threading.Lock()


def load_unet(name: str, level: str) -> UNet2DModel:
    """`name`'s UNet at `level`: "fp32" or "B-bit GRANULARITY" (8-bit per_channel: the real int8 path). Each level
    gets a module of its own, loaded once and kept (the 16 most recent); loading and quantizing run under one lock,
    because requests arrive concurrently and torchao's quantization is not safe to run from several threads at once;
    a load that fails keeps nothing."""
    key = (name, level)
    with LOADING:
        if key not in LOADED:
            path = model_dir(name).pipeline_path()
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True).eval()
            if level == INT8:
                unet = quantize_for_deployment(unet)
            elif level != "fp32":
                bits, granularity = level.split("-bit ")
                quantize_weights_(unet, int(bits), granularity)
            LOADED[key] = unet.to(DEVICE)
            if len(LOADED) > 16:
                LOADED.popitem(last=False)
        LOADED.move_to_end(key)
        return LOADED[key]


@functools.lru_cache(maxsize=8)
def scheduler_config(name: str) -> dict:
    return DDPMScheduler.load_config(model_dir(name).pipeline_path(), subfolder="scheduler")


def check_inputs(model: str, seed, steps, precision: str, num_images) -> tuple[int, int, int]:
    """Raise gr.Error with a one-line message for anything outside what the Space serves."""
    if model not in MODELS:
        raise gr.Error(f"Model {model!r} is not served here; choose one of: {', '.join(MODELS)}")
    if precision not in PRECISIONS:
        raise gr.Error(f"Precision {precision!r}: choose {' or '.join(PRECISIONS)}")
    try:
        seed, steps, num_images = int(seed), int(steps), int(num_images)
    except (TypeError, ValueError) as err:
        raise gr.Error("Seed, steps and number of images must be whole numbers") from err
    if not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"Seed must be from 0 to {MAX_SEED}, got {seed}")
    if steps not in STEPS:
        raise gr.Error(f"Steps must be {' or '.join(map(str, STEPS))}, got {steps}")
    if not 1 <= num_images <= MAX_IMAGES:
        raise gr.Error(f"Number of images must be from 1 to {MAX_IMAGES}, got {num_images}")
    return seed, steps, num_images


def timed_samples(name: str, level: str, seed: int, steps: int, num_images: int) -> tuple[np.ndarray, float]:
    unet = load_unet(name, level)
    # A scheduler per request: set_timesteps mutates it, and requests run concurrently.
    scheduler = DDPMScheduler.from_config(scheduler_config(name))
    start = time.perf_counter()
    images = sample_images(unet, scheduler, num_images, steps, seed=seed, batch_size=num_images, show_progress=False)
    return images, time.perf_counter() - start


def generate(model: str, seed, steps, precision: str, num_images):
    """fp32 and quantized grids from the same seed, their per-image difference, timings and the model's plots."""
    seed, steps, num_images = check_inputs(model, seed, steps, precision, num_images)
    fp32, fp32_seconds = timed_samples(model, "fp32", seed, steps, num_images)
    quantized, quantized_seconds = timed_samples(model, LEVELS[precision], seed, steps, num_images)
    difference = np.abs(fp32.astype(np.int16) - quantized.astype(np.int16))
    per_image = difference.reshape(num_images, -1).mean(axis=1)
    summary = "\n".join(
        [
            f"**fp32**: {fp32_seconds:.2f} s · **{precision}**: {quantized_seconds:.2f} s "
            f"({num_images} images, {steps} DDPM steps, seed {seed})",
            "",
            f"Mean absolute pixel difference per image (0-255): {', '.join(f'{d:.1f}' for d in per_image)}; "
            f"overall {per_image.mean():.2f}",
        ]
    )
    # Differences are small: stretched x4 so that they can be seen.
    difference_grid = image_grid(np.clip(difference * 4, 0, 255).astype(np.uint8))
    evaluation = model_dir(model).evaluation_path()
    plots = [(str(evaluation / file), title) for file, title in PLOTS.items() if (evaluation / file).is_file()]
    return image_grid(fp32), image_grid(quantized), difference_grid, summary, plots


def check_comparison(bits, granularity: str, seed, steps, num_images) -> tuple[int, int, int, int]:
    """The second tab's inputs, or a gr.Error with a one-line message."""
    if granularity not in GRANULARITIES:
        raise gr.Error(f"Granularity {granularity!r}: choose {' or '.join(GRANULARITIES)}")
    try:
        bits = int(bits)
    except (TypeError, ValueError) as err:
        raise gr.Error("Bits must be a whole number") from err
    if not BITS[0] <= bits <= BITS[1]:
        raise gr.Error(f"Bits must be from {BITS[0]} to {BITS[1]}, got {bits}")
    seed, steps, num_images = check_inputs(MODELS[0], seed, steps, "8-bit", num_images)
    return bits, seed, steps, num_images


def study_results(name: str, bits: int, granularity: str) -> str:
    """One table row of the model's own evaluation, where it has one: KID and FID at T'=20 before -> after at this
    level (when evaluated there), LPF, and the fixed-loss increase at this level of its sensitivity curve."""
    result = model_dir(name).read_evaluations().get("raw")
    if result is None:
        return f"| {name} | (not evaluated) | | | |"
    quantized = result.get("quantization", {})
    at_level = quantized.get("granularity") == granularity and str(bits) in quantized.get("kid", {})
    cells = []
    for metric, scale in (("kid", 1e3), ("fid", 1.0)):
        fp32 = result.get(metric, {}).get("20")
        if fp32 is None:
            cells.append("-")
            continue
        before = scale * (fp32["mean"] if metric == "kid" else fp32)
        after = quantized[metric][str(bits)]["20"] if at_level else None
        after = None if after is None else scale * (after["mean"] if metric == "kid" else after)
        cells.append(f"{before:.2f}" + ("" if after is None else f" -> {after:.2f}"))
    lpf = result.get("lpf", {}).get("lpf")
    point = result.get("sensitivity", {}).get("curves", {}).get(granularity, {}).get(str(bits))
    cells.append("-" if lpf is None else f"{lpf:.4g}")
    cells.append("-" if point is None else f"{point['loss_increase']:+.3g}")
    return f"| {name} | " + " | ".join(cells) + " |"


def compare_models(bits, granularity: str, seed, steps, num_images):
    """Every served model at one precision, from the same noises: DDIM (eta = 0) samples at fp32 and quantized, the
    mean pixel displacement of each model, its own evaluation's results and its quantization-sensitivity plot."""
    bits, seed, steps, num_images = check_comparison(bits, granularity, seed, steps, num_images)
    level = f"{bits}-bit {granularity}"
    gallery, lines = [], []
    for name in MODELS:
        scheduler = DDPMScheduler.from_config(scheduler_config(name))
        fp32 = ddim_images(load_unet(name, "fp32"), scheduler, num_images, steps, seed)
        quantized = ddim_images(load_unet(name, level), scheduler, num_images, steps, seed)
        moved = float((quantized - fp32).abs().mean())
        for images, caption in ((fp32, f"{name} · fp32"), (quantized, f"{name} · {level}: moved {moved:.2f} pixels")):
            grid = image_grid(to_uint8(images).numpy().transpose(0, 2, 3, 1))
            gallery.append((grid, caption))
        lines.append(f"| {name} | {moved:.2f} |")
    real_int8 = " (the real int8 path)" if level == INT8 else ""
    header = [
        f"**{level}**{real_int8}: the same {num_images} noises, DDIM (eta = 0), {steps} steps, seed {seed}",
        "",
        "| model | pixels moved (mean, 0-255) |",
        "|---|---|",
        *lines,
        "",
        f"Each model's own evaluation (T'=20; KID x10³ and FID fp32 -> {level} where it was evaluated there):",
        "",
        f"| model | KID x10³ | FID | LPF | fixed-loss increase at {level} |",
        "|---|---|---|---|---|",
        *(study_results(name, bits, granularity) for name in MODELS),
    ]
    plots = []
    for name in MODELS:
        plot = model_dir(name).evaluation_path() / "sensitivity.png"
        if plot.is_file():
            plots.append((str(plot), f"{name}: quantization sensitivity"))
    return gallery, "\n".join(header), plots


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="diffusers-flat: fp32 vs quantized DDPM samples") as demo:
        gr.Markdown(
            "# fp32 vs quantized DDPM samples\nModels trained toward flat minima (SAM, SWA, EMA, input perturbation) "
            "with diffusers-flat should lose little under weight quantization. Both grids start from the same noise."
        )
        with gr.Tab("One model: fp32 vs quantized"):
            with gr.Row():
                model = gr.Dropdown(MODELS, value=MODELS[0], label="Model")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                steps = gr.Radio(list(STEPS), value=STEPS[0], label="Sampling steps")
                precision = gr.Radio(list(PRECISIONS), value="8-bit", label="Precision")
                num_images = gr.Slider(1, MAX_IMAGES, value=MAX_IMAGES, step=1, label="Images")
            button = gr.Button("Generate", variant="primary")
            with gr.Row():
                fp32_image = gr.Image(label="fp32", type="pil", format="png")
                quantized_image = gr.Image(label="quantized", type="pil", format="png")
                difference_image = gr.Image(label="|fp32 - quantized| x4", type="pil", format="png")
            summary = gr.Markdown()
            gr.Markdown(" · ".join(PRECISIONS.values()))
            plots = gr.Gallery(
                label="Evaluation results of this model", columns=2, height="auto", object_fit="contain"
            )
        with gr.Tab("Model against model"):
            gr.Markdown(
                "Every served model at one precision, from the same noises (DDIM, eta = 0, so that a sample moves "
                "only as far as the weights move it): a flat model should barely change where a sharp one does. "
                "8-bit per_channel is the real int8 path; every other level quantizes the weights directly."
            )
            with gr.Row():
                bits = gr.Slider(BITS[0], BITS[1], value=4, step=1, label="Bits")
                granularity = gr.Radio(list(GRANULARITIES), value="per_tensor", label="Granularity")
                compare_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                compare_steps = gr.Radio(list(STEPS), value=STEPS[0], label="DDIM steps")
                compare_images = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="Images per model")
            compare_button = gr.Button("Compare", variant="primary")
            samples = gr.Gallery(
                label="fp32 and quantized, model by model", columns=2, height="auto", object_fit="contain"
            )
            comparison = gr.Markdown()
            curves = gr.Gallery(
                label="Quantization-sensitivity curves", columns=1, height="auto", object_fit="contain"
            )
        inputs = [model, seed, steps, precision, num_images]
        outputs = [fp32_image, quantized_image, difference_image, summary, plots]
        button.click(generate, inputs, outputs, api_name="generate")
        demo.load(generate, inputs, outputs, api_visibility="private")
        compare_inputs = [bits, granularity, compare_seed, compare_steps, compare_images]
        compare_button.click(compare_models, compare_inputs, [samples, comparison, curves], api_name="compare_models")
    # Requests wait in a queue; two run at once, so one slow 100-step request does not hold everybody up.
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo


if __name__ == "__main__":
    missing = [m for m in MODELS if not Path(m).is_dir() and m.count("/") != 1]
    if not MODELS:
        raise SystemExit("app.py: error: FLAT_MODELS: no models; name Hub repo ids or local pipeline dirs")
    if missing:
        raise SystemExit(
            f"app.py: error: FLAT_MODELS: {', '.join(missing)} is neither a local pipeline dir nor a "
            "Hub repo id (user/name); train one with training_scripts/train_flat_ddpm.py"
        )
    build_demo().launch()
