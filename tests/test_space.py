"""The Gradio Space: the real app served on 127.0.0.1, driven with gradio_client, and its page rendered in Debian's
headless Chromium (through Playwright, which is given /usr/bin/chromium and downloads nothing)."""

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
from conftest import REPO, free_port, per_image_generators, run_script
from diffusers import DDPMPipeline
from PIL import Image

pytestmark = pytest.mark.slow  # a real server, gradio_client and Chromium

gradio_client = pytest.importorskip("gradio_client")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts")


@pytest.fixture(scope="module")
def model(tmp_path_factory, two_models):
    """A micro model with evaluation plots in its dir."""
    out = tmp_path_factory.mktemp("space") / "micro"
    shutil.copytree(two_models[0], out)
    small = "--metrics perturbation --gammas 0 5 --directions 1 --loss_samples 16"
    result = run_script("evaluate_flat", "--model_path", out, *small.split(), "--output_dir", out.parent / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    port = free_port()
    env = dict(
        os.environ,
        FLAT_MODELS=str(model),
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
    return np.round(images[..., 0] * 255).astype(np.uint8)


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
