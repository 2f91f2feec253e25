"""fp32 vs quantized samples of DDPMs trained with diffusers-flat, drawn as a user draws them: with the model's own
DDIMPipeline or DDPMPipeline. One model's fp32 and quantized samples from the same seed (first tab), and every served
model side by side at one precision from the same noises (second tab: a flat and a sharp model, the paper's Figures 2
and 4; it opens on the shipped pair at 4-bit per-channel weights, what the real int4 model computes).

    python spaces_app/app.py                                  # the models shipped in spaces_app/models
    FLAT_MODELS=ddpm-flat-digits python spaces_app/app.py     # or your own

FLAT_MODELS lists Hub repo ids or local pipeline dirs, comma-separated; by default the flat and the sharp model
shipped in spaces_app/models. Gradio's own GRADIO_SERVER_NAME and GRADIO_SERVER_PORT choose where it listens. Only
safetensors weights are read, and no remote code is run. The UNets run on the GPU when there is one (a GPU Space),
else on the CPU.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from huggingface_hub import snapshot_download
from PIL import Image

from diffusers_flat.evaluation.levels import quantization_levels
from diffusers_flat.evaluation.plots import plot_quantized_samples, plot_sensitivity
from diffusers_flat.metrics.class_fidelity import class_fidelity, classify, load_classifier, stored_test_counts
from diffusers_flat.quantization import GRANULARITIES, quantize_for_deployment, quantize_weights_
from diffusers_flat.run_directory import RunDirectory, hub_download_patterns
from diffusers_flat.sampling import SAMPLERS, image_grid, sample_images
from diffusers_flat.training.config import training_config

# What the studies established about the comparison this tab opens on (4-bit per-channel weights): kept in step with
# the README, never more than the reports say.
VERDICT = (
    "Do SAM-trained models lose less at 4 bits than plain ones? Not decided: the deployment study (Fashion-MNIST, "
    "8 seeds, the EMA pipelines, DDIMPipeline 50 steps) tests exactly this as its primary endpoint, and SAM's KID "
    "increase from fp32 to 4-bit per-channel weights was x0.59 of a plain model's [x0.27, x1.28], p = 0.15: "
    "inconclusive (the design would have seen x0.35). "
    "SAM-trained models' samples move less at 4 bits (x0.54, Holm p 0.10: not established after correcting for 15 "
    "claims); they are flatter (LPF, SAM and momentum SAM) and full SAM samples worse at fp32 (KID), both "
    "established. "
    "The two models here are the Fashion-MNIST study's raw seed-1 pair: one look, not evidence."
)

# The default: the flat and the sharp model shipped beside the app (the Fashion-MNIST study's ADM and SAM, one seed).
SHIPPED = sorted(str(p) for p in (Path(__file__).parent / "models").glob("*") if (p / "model_index.json").is_file())
MODELS = [m.strip() for m in os.environ.get("FLAT_MODELS", ",".join(SHIPPED)).split(",") if m.strip()]
# the first tab's precisions: the two real torchao paths and a direct level -> the level each computes
PRECISIONS = {
    "8-bit (torchao)": "8-bit per_channel",
    "4-bit (torchao)": "4-bit per_channel",
    "4-bit per-tensor": "4-bit per_tensor",
}
PRECISION_NOTES = (
    "8-bit (torchao) and 4-bit (torchao): real int8 / int4 weights, torchao tensors on every Conv2d and Linear, one "
    "scale per output channel (what deployment ships) · 4-bit per-tensor: direct quantization, one scale per tensor"
)
REAL = {8: "8-bit per_channel", 4: "4-bit per_channel"}  # bits -> the level the real torchao path computes
BITS = (3, 8)  # the second tab's slider
STEPS = (20, 50, 100)
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


def label(name: str) -> str:
    """How a model is shown: a local directory by its name, a Hub model by its repo id."""
    return Path(name).name if Path(name).is_dir() else name


SERVED = {label(m): m for m in MODELS}  # the name a visitor picks -> the directory or repo id


LOADED: OrderedDict[tuple[str, str], UNet2DModel] = OrderedDict()  # (model, level) -> UNet, newest last
LOADING = threading.Lock()


def load_unet(name: str, level: str) -> UNet2DModel:
    """`name`'s UNet at `level`: "fp32" or "B-bit GRANULARITY" (8 and 4 bits per channel: the real torchao int8 and
    int4 paths, which compute exactly those levels). Each level gets a module of its own, loaded once and kept (the 16
    most recent); loading and quantizing run under one lock, because requests arrive concurrently and torchao's
    quantization is not safe to run from several threads at once; a load that fails keeps nothing."""
    key = (name, level)
    with LOADING:
        if key not in LOADED:
            path = model_dir(name).pipeline_path()
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True).eval()
            bits, _, granularity = level.partition("-bit ")
            if level in REAL.values():
                unet = quantize_for_deployment(unet, int(bits))
            elif level != "fp32":
                quantize_weights_(unet, int(bits), granularity)
            LOADED[key] = unet.to(DEVICE)
            if len(LOADED) > 16:
                LOADED.popitem(last=False)
        LOADED.move_to_end(key)
        return LOADED[key]


@functools.lru_cache(maxsize=8)
def scheduler_config(name: str) -> dict:
    return DDPMScheduler.load_config(model_dir(name).pipeline_path(), subfolder="scheduler")


@functools.lru_cache(maxsize=1)
def classifier():
    """The shipped Fashion-MNIST classifier and its test set's class histogram (class fidelity)."""
    network = load_classifier("fashion-mnist")
    return network, stored_test_counts(network)


def classified(name: str) -> bool:
    """Class fidelity applies to models of the classifier's data: Fashion-MNIST (`--dataset_name fashion_mnist`) at
    the classifier's image size."""
    if training_config(model_dir(name)).data.dataset_name != "fashion_mnist":
        return False
    config, reads = UNet2DModel.load_config(model_dir(name).pipeline_path(), subfolder="unet"), classifier()[0].config
    return (config["in_channels"], config["sample_size"]) == (reads.num_channels, reads.image_size)


def check_inputs(model: str, seed, sampler: str, steps, precision: str, num_images) -> tuple[int, int, int]:
    """Raise gr.Error with a one-line message for anything outside what the Space serves."""
    if model not in SERVED:
        raise gr.Error(f"Model {model!r} is not served here; choose one of: {', '.join(SERVED)}")
    if precision not in PRECISIONS:
        raise gr.Error(f"Precision {precision!r}: choose {' or '.join(PRECISIONS)}")
    return check_sampling(seed, sampler, steps, num_images)


def check_sampling(seed, sampler: str, steps, num_images) -> tuple[int, int, int]:
    if sampler not in SAMPLERS:
        raise gr.Error(f"Sampler {sampler!r}: choose {' or '.join(SAMPLERS)}")
    try:
        seed, steps, num_images = int(seed), int(steps), int(num_images)
    except (TypeError, ValueError) as err:
        raise gr.Error("Seed, steps and number of images must be whole numbers") from err
    if not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"Seed must be from 0 to {MAX_SEED}, got {seed}")
    if steps not in STEPS:
        raise gr.Error(f"Steps must be {', '.join(map(str, STEPS))}, got {steps}")
    if not 1 <= num_images <= MAX_IMAGES:
        raise gr.Error(f"Number of images must be from 1 to {MAX_IMAGES}, got {num_images}")
    return seed, steps, num_images


def timed_samples(name: str, level: str, seed: int, sampler: str, steps: int, num_images: int):
    """The pipeline's samples (uint8 NHWC) of `name` at `level`, and the seconds they took."""
    unet = load_unet(name, level)
    # A scheduler per request: set_timesteps mutates it, and requests run concurrently.
    scheduler = DDPMScheduler.from_config(scheduler_config(name))
    start = time.perf_counter()
    images = sample_images(unet, scheduler, num_images, steps, seed, num_images, False, sampler=sampler)
    return images, time.perf_counter() - start


def generate(model: str, seed, sampler: str, steps, precision: str, num_images):
    """fp32 and quantized grids from the same seed, their per-image difference, timings and the model's plots."""
    seed, steps, num_images = check_inputs(model, seed, sampler, steps, precision, num_images)
    model = SERVED[model]
    fp32, fp32_seconds = timed_samples(model, "fp32", seed, sampler, steps, num_images)
    quantized, quantized_seconds = timed_samples(model, PRECISIONS[precision], seed, sampler, steps, num_images)
    difference = np.abs(fp32.astype(np.int16) - quantized.astype(np.int16))
    per_image = difference.reshape(num_images, -1).mean(axis=1)
    summary = "\n".join(
        [
            f"**fp32**: {fp32_seconds:.2f} s · **{precision}**: {quantized_seconds:.2f} s "
            f"({num_images} images, {sampler.upper()} pipeline, {steps} steps, seed {seed})",
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


def check_comparison(bits, granularity: str, seed, sampler: str, steps, num_images) -> tuple[int, int, int, int]:
    """The second tab's inputs, or a gr.Error with a one-line message."""
    if granularity not in GRANULARITIES:
        raise gr.Error(f"Granularity {granularity!r}: choose {' or '.join(GRANULARITIES)}")
    try:
        bits = int(bits)
    except (TypeError, ValueError) as err:
        raise gr.Error("Bits must be a whole number") from err
    if not BITS[0] <= bits <= BITS[1]:
        raise gr.Error(f"Bits must be from {BITS[0]} to {BITS[1]}, got {bits}")
    return bits, *check_sampling(seed, sampler, steps, num_images)


def evaluated_kid(name: str, bits: int, granularity: str) -> str:
    """KID x10³ fp32 -> at this level (the change) from the model's own evaluation, where it was evaluated there."""
    result = model_dir(name).read_evaluations().get("raw", {})
    level = quantization_levels(result).get(f"{bits}:{granularity}")
    if level is None or not level.get("kid"):
        return "(not evaluated at this level)"
    steps = next(iter(level["kid"]))
    before, after = 1e3 * result["kid"][steps]["mean"], 1e3 * level["kid"][steps]["mean"]
    sampler = result.get("quantization", {}).get("sampler", "ddpm").upper()
    return f"{before:.1f} → {after:.1f} ({after - before:+.1f}; {sampler}, {steps} steps)"


def compare_models(bits, granularity: str, seed, sampler: str, steps, num_images):
    """Every served model at one precision, from the same noises, as its pipeline samples: one figure (a row per
    model: fp32 and quantized), each model's pixel displacement, class fidelity and evaluated ΔKID."""
    bits, seed, steps, num_images = check_comparison(bits, granularity, seed, sampler, steps, num_images)
    level = f"{bits}-bit {granularity}"
    panels, lines = {}, []
    for shown, name in SERVED.items():
        fp32, _ = timed_samples(name, "fp32", seed, sampler, steps, num_images)
        quantized, _ = timed_samples(name, level, seed, sampler, steps, num_images)
        moved = float(np.abs(quantized.astype(np.float64) - fp32).mean())
        panels[shown] = (image_grid(fp32), image_grid(quantized), moved)
        fidelity = "- | -"
        if classified(name):
            network, counts = classifier()
            f = class_fidelity(classify(network, fp32), classify(network, quantized), counts)
            fidelity = f"{f['kept']:.0%} | {f['fp32_histogram_distance']:.2f} → {f['histogram_distance']:.2f}"
        lines.append(f"| {shown} | {moved:.2f} | {fidelity} | {evaluated_kid(name, bits, granularity)} |")
    sampling = f"{'DDIMPipeline, eta 0' if sampler == 'ddim' else 'DDPMPipeline'}, {steps} steps, seed {seed}"
    with tempfile.TemporaryDirectory() as tmp:
        plot_quantized_samples(panels, level, sampling, Path(tmp) / "figure.png")
        figure = Image.open(Path(tmp) / "figure.png").copy()
    real = f" (what the real int{bits} model computes)" if REAL.get(bits) == level else ""
    summary = [
        f"**{level}**{real}: the same {num_images} noises, {sampling}",
        "",
        "| model | pixels moved (mean, 0-255) | class kept | class histogram vs the test set's (fp32 → quantized) "
        "| KID x10³ fp32 → quantized (evaluated) |",
        "|---|---|---|---|---|",
        *lines,
        "",
        "Class kept: the shipped Fashion-MNIST classifier's label of each sample, fp32 against quantized; the "
        "histogram distance is the total variation between the samples' classes and the test set's (0: the same).",
    ]
    return figure, "\n".join(summary), sensitivity_curves()


@functools.lru_cache(maxsize=1)
def sensitivity_curves() -> Image.Image | None:
    """Every served model's quantization-sensitivity curve from its own evaluation, in one figure (None when no model
    was evaluated with the ladder)."""
    results = {}
    for shown, name in SERVED.items():
        result = model_dir(name).read_evaluations().get("raw", {})
        if "sensitivity" in result:
            results[shown] = result
    if not results:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        plot_sensitivity(results, Path(tmp) / "curves.png")
        return Image.open(Path(tmp) / "curves.png").copy()


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="diffusers-flat: fp32 vs quantized DDPM samples") as demo:
        gr.Markdown(
            "# fp32 vs quantized DDPM samples\nModels trained with diffusers-flat (SAM, SWA, EMA, input "
            "perturbation), at fp32 and with quantized weights. Samples come from the model's own DDIMPipeline or "
            "DDPMPipeline, as a user draws them; both grids start from the same noise."
        )
        with gr.Tab("One model: fp32 vs quantized"):
            with gr.Row():
                model = gr.Dropdown(list(SERVED), value=next(iter(SERVED)), label="Model")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                sampler = gr.Radio(list(SAMPLERS), value="ddim", label="Sampler")
                steps = gr.Radio(list(STEPS), value=50, label="Sampling steps")
                precision = gr.Radio(list(PRECISIONS), value="4-bit (torchao)", label="Precision")
                num_images = gr.Slider(1, MAX_IMAGES, value=MAX_IMAGES, step=1, label="Images")
            button = gr.Button("Generate", variant="primary")
            with gr.Row():
                fp32_image = gr.Image(label="fp32", type="pil", format="png")
                quantized_image = gr.Image(label="quantized", type="pil", format="png")
                difference_image = gr.Image(label="|fp32 - quantized| x4", type="pil", format="png")
            summary = gr.Markdown()
            gr.Markdown(PRECISION_NOTES)
            plots = gr.Gallery(
                label="Evaluation results of this model", columns=2, height="auto", object_fit="contain"
            )
        with gr.Tab("Model against model"):
            gr.Markdown(
                f"Every served model at one precision, from the same noises. {VERDICT} 8-bit and 4-bit per_channel "
                "are the real torchao int8 and int4 paths; every other level quantizes the weights directly."
            )
            with gr.Row():
                bits = gr.Slider(BITS[0], BITS[1], value=4, step=1, label="Bits")
                granularity = gr.Radio(list(GRANULARITIES), value="per_channel", label="Granularity")
                compare_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                compare_sampler = gr.Radio(list(SAMPLERS), value="ddim", label="Sampler")
                compare_steps = gr.Radio(list(STEPS), value=50, label="Steps")
                compare_images = gr.Slider(1, MAX_IMAGES, value=8, step=1, label="Images per model")
            compare_button = gr.Button("Compare", variant="primary")
            figure = gr.Image(label="fp32 and quantized, a row per model", type="pil", format="png")
            comparison = gr.Markdown()
            curves = gr.Image(label="Quantization-sensitivity curves (each model's evaluation)", type="pil")
        inputs = [model, seed, sampler, steps, precision, num_images]
        outputs = [fp32_image, quantized_image, difference_image, summary, plots]
        button.click(generate, inputs, outputs, api_name="generate")
        demo.load(generate, inputs, outputs, api_visibility="private")
        compare_inputs = [bits, granularity, compare_seed, compare_sampler, compare_steps, compare_images]
        compare_outputs = [figure, comparison, curves]
        compare_button.click(compare_models, compare_inputs, compare_outputs, api_name="compare_models")
        demo.load(compare_models, compare_inputs, compare_outputs, api_visibility="private")
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
