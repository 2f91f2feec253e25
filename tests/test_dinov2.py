"""DINOv2 as a second feature space, on a small randomly initialised DINOv2 built from its config (no pretrained
weights exist offline): the preprocessing against a hand computation, the features against transformers' own model
output, the one-line error without weights, and an evaluation with `--features dinov2` from a local directory."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.arguments import parse_evaluation_flags
from diffusers_flat.evaluation.runs import evaluate_runs
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.dinov2 import DINOv2Features, dinov2_pixels
from diffusers_flat.metrics.fid import feature_network

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return Dinov2Model(config).eval()


def test_preprocessing_is_imagenet_normalisation_at_224():
    # A constant grayscale image stays constant under any resize: each channel is (v / 255 - mean) / std.
    gray = torch.full((1, 1, 28, 28), 200, dtype=torch.uint8)
    expected = (200 / 255 - MEAN) / STD
    x = dinov2_pixels(gray)
    assert x.shape == (1, 3, 224, 224)
    for channel in range(3):
        np.testing.assert_allclose(x[0, channel].numpy(), expected[channel], atol=1e-5)
    # An RGB image already at 224x224 is only normalised.
    rgb = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    hand = (rgb.numpy() / 255 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(dinov2_pixels(rgb).numpy(), hand, atol=1e-5)


def test_features_are_the_models_class_token(tiny_dinov2):
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    ours = DINOv2Features(tiny_dinov2, "tiny")(images)
    # transformers' own forward on the hand-made input: the class token of the last (normalised) hidden state
    rgb = images.float().repeat(1, 3, 1, 1) / 255
    resized = torch.nn.functional.interpolate(rgb, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    normalised = (resized - torch.tensor(MEAN).view(1, 3, 1, 1).float()) / torch.tensor(STD).view(1, 3, 1, 1).float()
    with torch.no_grad():
        expected = tiny_dinov2(pixel_values=normalised).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert ours.shape == (3, 32)


def test_no_weights_offline_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(FlatError, match=r"no DINOv2 weights found .*hf download facebook/dinov2-large") as err:
        feature_network("dinov2", dinov2_model=str(tmp_path / "missing"))
    assert err.value.parameter == "dinov2_model" and "\n" not in str(err.value)
    with pytest.raises(FlatError, match="features 'clip': choose inception or dinov2"):
        parse_evaluation_flags(["--features", "clip"])
    # a study file's evaluation flags go through the same parser
    settings, _ = parse_evaluation_flags(["--features", "dinov2", "--dinov2_model", str(tmp_path / "local")])
    assert (settings.features, settings.dinov2_model) == ("dinov2", str(tmp_path / "local"))


@pytest.mark.slow
def test_an_evaluation_in_dinov2_space_from_a_local_directory(two_models, tiny_dinov2, tmp_path):
    tiny_dinov2.save_pretrained(tmp_path / "dinov2")
    model = shutil.copytree(two_models[0], tmp_path / "adm")
    settings = EvaluationSettings(
        metrics=("fid",), inference_steps=(2,), num_samples=100, num_real=100, features="dinov2",
        dinov2_model=str(tmp_path / "dinov2"),
    )  # fmt: skip
    cache = tmp_path / "cache"
    result = evaluate_runs([model], "raw", settings, tmp_path / "eval", cache_dir=cache)["adm"]
    assert result["features"] == f"dinov2 ({tmp_path / 'dinov2'})"
    pr = result["precision_recall"]["2"]
    assert 0 <= pr["precision"] <= 1 and 0 <= pr["recall"] <= 1 and pr["k"] == 3
    assert result["fid"]["2"] > 0
    # the real images' features are cached under the feature network's name: a second evaluation reads them
    (cached,) = cache.glob("fid-real-*.pt")
    assert torch.load(cached)["features"].shape == (100, 32)
    again = evaluate_runs([model], "raw", settings, tmp_path / "again", cache_dir=cache)["adm"]
    assert again["fid"] == result["fid"] and len(list(cache.glob("fid-real-*.pt"))) == 1
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert written["adm"]["features"] == result["features"]
