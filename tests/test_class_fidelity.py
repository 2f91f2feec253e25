"""Class fidelity: its counts against hand counts, the shipped Fashion-MNIST classifier on the real test set (its
card's accuracy, its stored test histogram), and bad input."""

import json

import numpy as np
import pytest
import torch

from diffusers_flat.data import fashion_mnist
from diffusers_flat.errors import FlatError
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.class_fidelity import (
    SHIPPED,
    class_fidelity,
    classify,
    histogram_distance,
    load_classifier,
    stored_test_counts,
)
from diffusers_flat.run_directory import DataSource

REAL = fashion_mnist.local_files("test") is not None


def test_class_fidelity_is_what_a_hand_count_gives():
    fp32 = np.array([0, 1, 2, 2, 3, 3, 3, 0])
    quantized = np.array([0, 1, 1, 2, 3, 0, 0, 0])  # kept: positions 0, 1, 3, 4, 7 = 5 of 8
    reference = np.array([10, 10, 10, 10])  # uniform over 4 classes
    result = class_fidelity(fp32, quantized, reference)
    assert result["kept"] == 5 / 8 and result["num_samples"] == 8
    # quantized frequencies 4/8, 2/8, 1/8, 1/8 against 1/4 each: |0.25| + 0 + |0.125| + |0.125| = 0.5, halved
    assert result["histogram_distance"] == pytest.approx(0.25)
    # fp32: 2/8, 1/8, 2/8, 3/8: 0 + 0.125 + 0 + 0.125 = 0.25, halved
    assert result["fp32_histogram_distance"] == pytest.approx(0.125)
    assert histogram_distance(np.array([1, 1]), np.array([5, 0])) == 1.0  # disjoint
    with pytest.raises(FlatError, match="quantized: 2 labels against 3 fp32 ones"):
        class_fidelity(np.zeros(3, int), np.zeros(2, int), reference)


def test_classify_scales_uint8_images_to_the_models_range_and_checks_their_shape():
    classifier = load_classifier()
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    with torch.no_grad():  # by hand: x / 127.5 - 1, NCHW, argmax of the logits
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)) / 127.5 - 1
        expected = classifier(pixel_values=pixels).logits.argmax(1).numpy()
    np.testing.assert_array_equal(classify(classifier, images, batch_size=4), expected)
    with pytest.raises(FlatError, match="classifier: it reads 1-channel 16x16 images, these are 3-channel 8x8"):
        classify(classifier, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FlatError, match="classifier nowhere: neither fashion-mnist nor a directory"):
        load_classifier("nowhere")
    with pytest.raises(FlatError, match="classifier labels quantized samples: name the levels with quantize"):
        EvaluationSettings(metrics=("fid",), classifier="fashion-mnist")


def test_the_shipped_classifier_is_small_and_its_card_gives_its_accuracy():
    assert (SHIPPED["fashion-mnist"] / "model.safetensors").stat().st_size < 1_000_000
    card = (SHIPPED["fashion-mnist"] / "README.md").read_text()
    assert "Test accuracy:" in card and "train_classifier.py" in card
    counts = json.loads((SHIPPED["fashion-mnist"] / "test_label_counts.json").read_text())
    assert counts["images"] == sum(counts["counts"]) == 10_000 and len(counts["counts"]) == 10


@pytest.mark.skipif(not REAL, reason="needs Debian's dataset-fashion-mnist (the README's test command installs it)")
def test_the_shipped_classifier_labels_the_real_test_set_as_its_card_says():
    classifier = load_classifier()
    real = load_real_images(DataSource(dataset_name=fashion_mnist.NAME), 16, 1)
    labels = np.array(fashion_mnist.load_fashion_mnist("test")["label"])
    predicted = classify(classifier, real.held_out)
    accuracy = (predicted == labels).mean()
    card = (SHIPPED["fashion-mnist"] / "README.md").read_text()
    assert f"**Test accuracy: {accuracy:.2%}**" in card and accuracy > 0.85
    np.testing.assert_array_equal(np.bincount(predicted, minlength=10), stored_test_counts(classifier))
