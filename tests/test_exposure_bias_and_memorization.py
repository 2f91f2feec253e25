"""Exposure bias and the memorization ratio."""

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from helpers import MICRO_UNET

from diffusers_flat.evaluation.real_images import RealImages
from diffusers_flat.evaluation.registry import METRICS, Evaluation, MetricInputs
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.exposure_bias import exposure_bias
from diffusers_flat.metrics.memorization import memorization_ratio


def micro():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **MICRO_UNET)


def test_curves_coincide_when_the_chain_is_ground_truth():
    images = torch.rand(256, 3, 8, 8) * 2 - 1
    result = exposure_bias(
        micro(), DDPMScheduler(), images, num_inference_steps=5, chain="ground_truth", show_progress=False
    )
    assert result["timesteps"] == [800, 600, 400, 200, 0]
    np.testing.assert_allclose(result["sampling_norm"], result["training_norm"], rtol=0.02)
    model_chain = exposure_bias(micro(), DDPMScheduler(), images, num_inference_steps=5, show_progress=False)
    assert model_chain["training_norm"] == result["training_norm"]  # same ground-truth inputs
    assert model_chain["sampling_norm"] != result["sampling_norm"]
    assert np.isclose(model_chain["summed_gap"], sum(model_chain["gap"]))


def test_training_images_are_memorized_and_noise_is_not():
    rng = np.random.default_rng(0)
    training = rng.integers(0, 256, (50, 8, 8, 1)).astype(np.uint8)
    assert memorization_ratio(training, training)["memorization_ratio"] == 1.0
    noise = rng.integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
    result = memorization_ratio(noise, training)
    assert result["memorization_ratio"] == 0.0 and result["num_generated"] == 40


def test_near_copies_count_and_nearest_is_right():
    rng = np.random.default_rng(1)
    training = rng.integers(0, 256, (30, 4, 4, 3)).astype(np.float32)
    near = training[[3, 7]] + rng.normal(0, 1, (2, 4, 4, 3))
    far = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.float32)
    result = memorization_ratio(np.concatenate([near, far]), training)
    assert result["memorized"] == [True, True, False, False]
    assert result["nearest"][:2] == [3, 7]
    assert result["memorization_ratio"] == 0.5


def test_the_data_s_own_memorization_ratio_is_measured_on_held_out_images():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (20, 8, 8, 1)).astype(np.uint8)
    training = np.arange(10)  # the model trained on the first 10
    # 12 held-out images: 3 near-copies of training images (one pixel level off), 9 unrelated
    held_out = np.concatenate([np.clip(pixels[[1, 4, 8]].astype(int) + 1, 0, 255), pixels[10:19]]).astype(np.uint8)
    tensors = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    real = RealImages(pixels, tensors, {}, training=training, held_out=held_out)
    samples = pixels[:12]  # 12 samples: 10 copies of training images, 2 of unseen ones
    settings = EvaluationSettings(metrics=("memorization",))
    inputs = MetricInputs(None, DDPMScheduler(), real, settings, Evaluation({}, samples={20: samples}))
    METRICS["memorization"](inputs)
    memo = inputs.evaluation.result["memorization"]
    assert memo["memorization_ratio"] == 10 / 12 and memo["num_training"] == 10
    assert memo["held_out_ratio"] == 3 / 12  # all 12 held-out images drawn: the 3 near-copies count

    without = MetricInputs(
        None, DDPMScheduler(), RealImages(pixels, tensors, {}), settings, Evaluation({}, {20: samples})
    )
    METRICS["memorization"](without)
    assert without.evaluation.result["memorization"]["held_out_ratio"] is None  # no held-out split: not measured
