"""fp32 vs quantized samples of DDPMs trained with diffusers-flat, side by side from the same seed.

    FLAT_MODELS=ddpm-flat-digits python spaces_app/app.py

FLAT_MODELS lists Hub repo ids or local pipeline dirs, comma-separated. Gradio's own GRADIO_SERVER_NAME and
GRADIO_SERVER_PORT choose where it listens. Only safetensors weights are read, and no remote code is run. The UNets
run on the GPU when there is one (a GPU Space), else on the CPU.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import snapshot_download

from diffusers_flat.quantization import quantize_for_deployment, quantize_weights_
from diffusers_flat.run_directory import RunDirectory, hub_download_patterns
from diffusers_flat.utils.sampling import image_grid, sample_images

MODELS = [m.strip() for m in os.environ.get("FLAT_MODELS", "ddpm-flat-digits").split(",") if m.strip()]
PRECISIONS = {
    "8-bit": "8-bit: real int8 weights (torchao int8 tensors on every Conv2d and Linear, per output channel)",
    "4-bit": "4-bit: direct quantization of every Conv2d/Linear weight",
}
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


@functools.lru_cache(maxsize=16)
def load_unet(name: str, precision: str) -> UNet2DModel:
    unet = UNet2DModel.from_pretrained(model_dir(name).pipeline_path(), subfolder="unet", use_safetensors=True).eval()
    if precision == "8-bit":
        return quantize_for_deployment(unet).to(DEVICE)
    if precision == "4-bit":
        quantize_weights_(unet, bits=4, granularity="per_tensor")
    return unet.to(DEVICE)


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


def timed_samples(name: str, precision: str, seed: int, steps: int, num_images: int) -> tuple[np.ndarray, float]:
    unet = load_unet(name, precision)
    # A scheduler per request: set_timesteps mutates it, and requests run concurrently.
    scheduler = DDPMScheduler.from_config(scheduler_config(name))
    start = time.perf_counter()
    images = sample_images(unet, scheduler, num_images, steps, seed=seed, batch_size=num_images, show_progress=False)
    return images, time.perf_counter() - start


def generate(model: str, seed, steps, precision: str, num_images):
    """fp32 and quantized grids from the same seed, their per-image difference, timings and the model's plots."""
    seed, steps, num_images = check_inputs(model, seed, steps, precision, num_images)
    fp32, fp32_seconds = timed_samples(model, "fp32", seed, steps, num_images)
    quantized, quantized_seconds = timed_samples(model, precision, seed, steps, num_images)
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


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="diffusers-flat: fp32 vs quantized DDPM samples") as demo:
        gr.Markdown(
            "# fp32 vs quantized DDPM samples\nModels trained toward flat minima (SAM, SWA, EMA, input perturbation) "
            "with diffusers-flat should lose little under weight quantization. Both grids start from the same noise."
        )
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
        plots = gr.Gallery(label="Evaluation results of this model", columns=2, height="auto", object_fit="contain")
        inputs = [model, seed, steps, precision, num_images]
        outputs = [fp32_image, quantized_image, difference_image, summary, plots]
        button.click(generate, inputs, outputs, api_name="generate")
        demo.load(generate, inputs, outputs, api_visibility="private")
    # Requests wait in a queue; two run at once, so one slow 100-step request does not hold everybody up.
    demo.queue(max_size=32, default_concurrency_limit=2)
    return demo


if __name__ == "__main__":
    missing = [m for m in MODELS if not Path(m).is_dir() and m.count("/") != 1]
    if missing:
        raise SystemExit(
            f"app.py: error: FLAT_MODELS: {', '.join(missing)} is neither a local pipeline dir nor a "
            "Hub repo id (user/name); train one with training_scripts/train_flat_ddpm.py"
        )
    build_demo().launch()
