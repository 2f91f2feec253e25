"""The Gradio Space: the real app served on 127.0.0.1, driven with gradio_client (both tabs, also under concurrent
requests), and its page rendered in Debian's headless Chromium (through Playwright, which is given /usr/bin/chromium
and downloads nothing)."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, per_image_generators, run_script
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET
from PIL import Image

from diffusers_flat.quantization import quantize_weights_

pytestmark = pytest.mark.slow  # a real server, gradio_client and Chromium

gradio_client = pytest.importorskip("gradio_client")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts")


@pytest.fixture(scope="module")
def model(tmp_path_factory, two_models):
    """A micro model with evaluation plots in its dir."""
    out = tmp_path_factory.mktemp("space") / "micro"
    shutil.copytree(two_models[0], out)
    small = "--metrics perturbation lpf sensitivity --gammas 0 5 --directions 1 --loss_samples 16 --lpf_draws 2"
    small += " --ladder 8 4 --ladder_samples 2 --ladder_steps 2"
    result = run_script("evaluate_flat", "--model_path", out, *small.split(), "--output_dir", out.parent / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> dict[str, str]:
    """Two untrained micro pipelines, one of them with every Conv2d/Linear weight already on a 4-bit per-tensor
    grid: quantizing it to 4 bits per tensor again changes nothing."""
    out, models = tmp_path_factory.mktemp("toys"), {}
    for name in ("on-a-4-bit-grid", "off-the-grid"):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, **MICRO_UNET)
        with torch.no_grad():  # away from the initialisation, whose output layer is zero
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if name == "on-a-4-bit-grid":
            quantize_weights_(unet, 4, "per_tensor")
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(out / name)
        models[name] = str(out / name)
    return models


@pytest.fixture(scope="module")
def server(model, toy_models, tmp_path_factory):
    port = free_port()
    env = dict(
        os.environ,
        FLAT_MODELS=",".join([str(model), *toy_models.values()]),
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")),
    )
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w+")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "spaces_app" / "app.py")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
            time.sleep(1)
    yield url
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False)


def grid_cells(path, count: int, size: int) -> np.ndarray:
    """Cut image_grid's layout (2-pixel padding, near-square) back into its cells."""
    grid = np.asarray(Image.open(path).convert("L"))
    cols = int(np.ceil(np.sqrt(count)))
    cells = []
    for i in range(count):
        top, left = 2 + (i // cols) * (size + 2), 2 + (i % cols) * (size + 2)
        cells.append(grid[top : top + size, left : left + size])
    return np.stack(cells)


def reference_samples(model, seed: int, steps: int, count: int) -> np.ndarray:
    """Plain diffusers, nothing of ours: the fp32 images the app should show."""
    pipeline = DDPMPipeline.from_pretrained(model)
    images = pipeline(
        batch_size=count, generator=per_image_generators(count, seed), num_inference_steps=steps, output_type="np"
    ).images
    return np.floor(images[..., 0] * 255).astype(np.uint8)  # guided-diffusion's 8-bit truncation


def test_concurrent_mixed_requests_at_both_tabs_leave_nothing_broken(client, model):
    """8 requests at once, 8-bit and 4-bit, both tabs, each level's models loaded for the first time; then one
    request of each still succeeds alone."""
    jobs = [client.submit(str(model), i, 20, ("8-bit", "4-bit")[i % 2], 2, api_name="/generate") for i in range(4)]
    jobs += [
        client.submit(bits, granularity, i, 20, 2, api_name="/compare_models")
        for i, (bits, granularity) in enumerate([(8, "per_channel"), (4, "per_tensor")] * 2)
    ]
    for job in jobs:
        job.result(timeout=300)
    for precision in ("8-bit", "4-bit"):
        assert "overall" in client.predict(str(model), 0, 20, precision, 1, api_name="/generate")[3]
    for bits, granularity in ((8, "per_channel"), (4, "per_tensor")):
        assert "pixels moved" in client.predict(bits, granularity, 0, 20, 1, api_name="/compare_models")[1]


def moved(summary: str) -> dict[str, float]:
    """The first table of the comparison: model -> pixels moved."""
    return {name: float(value) for name, value in re.findall(r"^\| (\S+) \| (\d+\.\d+) \|$", summary, re.MULTILINE)}


def test_model_against_model_shows_the_model_on_the_grid_unmoved(client, model, toy_models):
    gallery, summary, curves = client.predict(4, "per_tensor", 5, 20, 4, api_name="/compare_models")
    served = [str(model), *toy_models.values()]
    # two panels per model, fp32 then quantized, 2x2 grids of 64-pixel cells
    assert [item["caption"].split(" · ")[0] for item in gallery] == [name for name in served for _ in range(2)]
    assert Image.open(gallery[0]["image"]).size == (134, 134)
    displacement = moved(summary)
    assert set(displacement) == set(served)
    assert displacement[toy_models["on-a-4-bit-grid"]] == 0.0  # the same weights: the same DDIM samples
    assert displacement[toy_models["off-the-grid"]] > 1.0
    # the shown displacement is that of the shown images (0-255; the grids round to whole values)
    for name in served:
        i = 2 * served.index(name)
        fp32, quantized = (grid_cells(gallery[j]["image"], 4, 64).astype(float) for j in (i, i + 1))
        assert abs(np.abs(fp32 - quantized).mean() - displacement[name]) < 0.6
    assert (
        "| model | KID x10³ | FID | LPF |" in summary
        and f"| {toy_models['off-the-grid']} | (not evaluated) |" in summary
    )
    # the evaluated model's own results, read here from its evaluation's JSON
    evaluated = json.loads((model / "evaluation" / "eval_results.json").read_text())
    increase = evaluated["sensitivity"]["curves"]["per_tensor"]["4"]["loss_increase"]
    assert f"| {model} | - | - | {evaluated['lpf']['lpf']:.4g} | {increase:+.3g} |" in summary
    assert "**4-bit per_tensor**: the same 4 noises" in summary
    assert [item["caption"] for item in curves] == [f"{model}: quantization sensitivity"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [({"bits": 2}, "Value 2 is less than minimum value 3."), ({"granularity": "per_row"}, "is not in the list")],
)
def test_bad_comparison_inputs_are_rejected_with_a_message(client, inputs, message):
    values = {"bits": 4, "granularity": "per_tensor", "seed": 0, "steps": 20, "num_images": 2, **inputs}
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        client.predict(*values.values(), api_name="/compare_models")


@pytest.mark.parametrize("precision", ["8-bit", "4-bit"])
def test_generation_for_each_precision(client, model, precision):
    fp32, quantized, difference, summary, plots = client.predict(str(model), 7, 20, precision, 4, api_name="/generate")
    # The micro model makes 8x8 images, shown enlarged 8x (64-pixel cells) in 2x2 grids.
    expected = reference_samples(model, 7, 20, 4).repeat(8, axis=1).repeat(8, axis=2)
    np.testing.assert_array_equal(grid_cells(fp32, 4, 64), expected)
    ours, theirs = grid_cells(quantized, 4, 64).astype(int), expected.astype(int)
    measured = np.abs(ours - theirs).reshape(4, -1).mean(axis=1)
    assert 0 < measured.mean() < 60  # changed by quantization, still the same pictures
    shown = [float(v) for v in re.search(r"per image \(0-255\): ([\d., ]+);", summary).group(1).split(", ")]
    np.testing.assert_allclose(shown, measured, atol=0.051)
    assert re.search(rf"\*\*fp32\*\*: \d+\.\d\d s · \*\*{precision}\*\*: \d+\.\d\d s", summary)
    np.testing.assert_array_equal(grid_cells(difference, 4, 64), np.clip(np.abs(ours - theirs) * 4, 0, 255))
    assert [caption for _, caption in [(p["image"], p["caption"]) for p in plots]] == [
        "Loss under random weight perturbation"
    ]


def test_8_bit_stays_closer_to_fp32_than_4_bit(client, model):
    differences = {}
    for precision in ("8-bit", "4-bit"):
        summary = client.predict(str(model), 3, 20, precision, 4, api_name="/generate")[3]
        differences[precision] = float(re.search(r"overall (\d+\.\d+)", summary).group(1))
    assert differences["8-bit"] < differences["4-bit"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"seed": -1}, "less than minimum value 0"),
        ({"seed": 2**32}, "greater than maximum value"),
        # gradio checks each component's choices and range first, naming the value and what is allowed.
        ({"steps": 50}, "Value: 50 (type: <class 'int'>) is not in the list of choices: [20, 100]"),
        (
            {"precision": "2-bit"},
            "Value: '2-bit' (type: <class 'str'>) is not in the list of choices: ['8-bit', '4-bit']",
        ),
        ({"num_images": 17}, "Value 17 is greater than maximum value 16."),
        ({"model": "someone/else"}, "Value: someone/else is not in the list of choices: ['"),
    ],
)
def test_bad_inputs_are_rejected_with_a_message(client, model, inputs, message):
    values = {"model": str(model), "seed": 0, "steps": 20, "precision": "8-bit", "num_images": 4, **inputs}
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        client.predict(*values.values(), api_name="/generate")


def test_a_slow_request_does_not_block_a_quick_one(client, model):
    slow = client.submit(str(model), 1, 100, "4-bit", 16, api_name="/generate")
    time.sleep(0.2)
    quick = client.submit(str(model), 2, 20, "8-bit", 1, api_name="/generate")
    quick.result(timeout=120)
    assert not slow.done(), "the quick request waited for the slow one"
    slow.result(timeout=300)


@pytest.mark.browser
def test_page_renders_controls_and_images_in_chromium(server):
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: apt-get install chromium (.ci/run does)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    with playwright.sync_playwright() as p:
        flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server)
        expect = playwright.expect
        for label in ("Model", "Seed", "Sampling steps", "Precision", "Images", "fp32", "quantized"):
            expect(page.get_by_text(label, exact=True).first).to_be_visible(timeout=60_000)
        expect(page.get_by_role("button", name="Generate")).to_be_visible()
        # The page generates once on load: fp32 and quantized grids (and the difference) appear as images.
        generated = "img[src*='gradio_api/file']"
        loaded = f'[...document.querySelectorAll("{generated}")].filter(i => i.complete && i.naturalWidth > 0)'
        page.wait_for_function(f"{loaded}.length >= 3", timeout=120_000)
        widths = page.eval_on_selector_all(generated, "images => images.map(i => i.naturalWidth)")
        assert widths.count(266) == 3  # fp32, quantized, difference: 4x4 grids (16 images) of 64-pixel cells
        page.screenshot(path=os.path.join(ARTIFACTS, "space.png"), full_page=True)
        # The second tab: every model at one precision, side by side.
        page.get_by_role("tab", name="Model against model").click()
        page.get_by_role("button", name="Compare").click()
        page.wait_for_function(f"{loaded}.length >= 9", timeout=120_000)  # 3 models x 2 grids, and the first tab's 3
        expect(page.get_by_text("pixels moved (mean, 0-255)").first).to_be_visible(timeout=60_000)
        page.screenshot(path=os.path.join(ARTIFACTS, "space-compare.png"), full_page=True)
        browser.close()
    assert Image.open(os.path.join(ARTIFACTS, "space.png")).size[0] == 1400


def test_app_refuses_a_model_that_is_neither_dir_nor_repo_id(tmp_path):
    env = dict(os.environ, FLAT_MODELS=str(tmp_path / "missing"), GRADIO_SERVER_PORT=str(free_port()))
    result = subprocess.run(
        [sys.executable, str(REPO / "spaces_app" / "app.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "FLAT_MODELS:" in result.stderr.strip().splitlines()[-1] and "missing" in result.stderr


def test_the_default_models_are_the_shipped_flat_and_sharp_pair(monkeypatch):
    """Without FLAT_MODELS the Space serves the pipelines in spaces_app/models, and each loads in plain diffusers."""
    monkeypatch.delenv("FLAT_MODELS", raising=False)
    monkeypatch.syspath_prepend(str(REPO / "spaces_app"))
    sys.modules.pop("app", None)
    app = importlib.import_module("app")
    shipped = sorted(p for p in (REPO / "spaces_app" / "models").iterdir() if (p / "model_index.json").is_file())
    assert app.MODELS == [str(p) for p in shipped] and len(shipped) == 2
    for path in shipped:
        pipeline = DDPMPipeline.from_pretrained(path)
        assert pipeline.unet.config.sample_size == 16
        assert (path / "evaluation" / "eval_results.json").is_file()
    # A sharp (plain) and a flat (SAM) model of the same seed, trained on the same data.
    args = [json.loads((path / "training_args.json").read_text()) for path in shipped]
    assert sorted(a["sam_rho"] > 0 for a in args) == [False, True]
    assert len({(a["seed"], a["dataset_name"], a["max_train_steps"]) for a in args}) == 1
    sys.modules.pop("app", None)
