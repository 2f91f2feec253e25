"""Class fidelity: does a sample keep its class when the weights are quantized? A small classifier labels the fp32
and the quantized samples drawn from the same noises; reported are the fraction of samples whose label survives, and
how far each set's class histogram lies from the test set's (total variation: half the L1 distance between the
two class frequencies; 0 when equal, 1 when disjoint). A measure a user reads without a feature space: "91% of the
shirts are still shirts at 4 bits".

The classifier is a `transformers` ResNet for images as the diffusion models saw them (uint8, scaled to [-1, 1]).
One ships with the package for Fashion-MNIST at 16x16 (`training_scripts/train_classifier.py` trained it; its card
gives its test accuracy); `load_classifier` also reads any other directory of that kind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from diffusers_flat.errors import FlatError

SHIPPED = {"fashion-mnist": Path(__file__).parent / "classifiers" / "fashion-mnist-16"}
TEST_COUNTS = "test_label_counts.json"  # the classifier's labels of its test set, counted per class


class ClassFidelity(TypedDict):
    kept: float  # the fraction of samples whose label is the same at fp32 and quantized
    histogram_distance: float  # total variation between the quantized samples' labels and the reference's
    fp32_histogram_distance: float  # the same for the fp32 samples
    num_samples: int


def load_classifier(name_or_path: str | os.PathLike = "fashion-mnist", device: str | torch.device = "cpu"):
    """A shipped classifier by name ("fashion-mnist") or a `ResNetForImageClassification` directory, in eval mode.

    Example:
        >>> load_classifier().config.num_labels
        10
    """
    from transformers import ResNetForImageClassification

    path = SHIPPED.get(str(name_or_path), Path(name_or_path))
    if not (Path(path) / "config.json").is_file():
        raise FlatError(
            f"classifier {name_or_path}: neither {' nor '.join(SHIPPED)} nor a directory with a config.json",
            "classifier",
        )
    return ResNetForImageClassification.from_pretrained(path).to(device).eval()


@torch.no_grad()
def classify(classifier: torch.nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The label of each uint8 NHWC image: the classifier's argmax on the image scaled to [-1, 1]."""
    config = classifier.config
    if images.shape[-1] != config.num_channels or images.shape[1] != config.image_size:
        raise FlatError(
            f"classifier: it reads {config.num_channels}-channel {config.image_size}x{config.image_size} images, "
            f"these are {images.shape[-1]}-channel {images.shape[1]}x{images.shape[2]}",
            "classifier",
        )
    device = next(classifier.parameters()).device
    labels = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        labels.append(classifier(pixel_values=batch.to(device)).logits.argmax(1).cpu())
    return torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)


def histogram_distance(labels: np.ndarray, reference_counts: np.ndarray) -> float:
    """Total variation between the class frequencies of `labels` and the class histogram `reference_counts`.

    Example:
        >>> histogram_distance(np.array([0, 0, 1, 1]), np.array([1, 3]))
        0.25
    """
    reference_counts = np.asarray(reference_counts, dtype=np.float64)
    p = np.bincount(labels, minlength=len(reference_counts)) / len(labels)
    return float(np.abs(p - reference_counts / reference_counts.sum()).sum() / 2)


def class_fidelity(fp32: np.ndarray, quantized: np.ndarray, reference_counts: np.ndarray) -> ClassFidelity:
    """Class fidelity from labels: of the fp32 and the quantized samples (the same noises, in the same order), and
    the class histogram of the reference images (the test set) as the same classifier labels them.

    Args:
        fp32: the labels of the fp32 samples.
        quantized: the labels of the quantized samples from the same noises.
        reference_counts: how many reference images the classifier puts in each class.

    Example:
        >>> class_fidelity(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), np.array([1, 1, 2]))["kept"]
        0.75
    """
    if len(fp32) != len(quantized) or not len(fp32):
        raise FlatError(f"quantized: {len(quantized)} labels against {len(fp32)} fp32 ones; pair them", "quantized")
    return {
        "kept": float((fp32 == quantized).mean()),
        "histogram_distance": histogram_distance(quantized, reference_counts),
        "fp32_histogram_distance": histogram_distance(fp32, reference_counts),
        "num_samples": len(fp32),
    }


def stored_test_counts(classifier: torch.nn.Module) -> np.ndarray:
    """The class histogram of the test set as a shipped classifier labels it, stored beside its weights by
    `training_scripts/train_classifier.py` (a Space has no test set to label)."""
    path = Path(classifier.name_or_path) / TEST_COUNTS
    if not path.is_file():
        raise FlatError(
            f"classifier {classifier.name_or_path}: no {TEST_COUNTS}; label a test set instead", "classifier"
        )
    return np.array(json.loads(path.read_text())["counts"])
