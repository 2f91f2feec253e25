"""What the `evaluate` modules under `evaluate_modules/` share: their input features (images, or feature vectors)
and the conversion of either into the (N, D) features the metrics take. The `evaluate` library reads a module's
inputs into an Arrow table: images arrive as PIL images, feature vectors as lists."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch

CONFIGS = ("features", "images")  # feature vectors (any feature space), or images (InceptionV3's features)


def module_features(config_name: str) -> datasets.Features:
    """The `evaluate` features of a module configured as "features" (the default) or "images"."""
    column = datasets.Image() if config_name == "images" else datasets.Sequence(datasets.Value("float64"))
    return datasets.Features({"predictions": column, "references": column})


def metric_info(
    description: str, citation: str, inputs_description: str, url: str, features: datasets.Features
) -> evaluate.MetricInfo:
    """A module's `_info`: its texts, its paper and its input features."""
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=features,
        reference_urls=[url],
    )


def as_uint8_images(rows: Sequence) -> np.ndarray:
    """PIL images or arrays of one size as uint8 NHWC (a grayscale image gets its channel axis)."""
    images = np.stack([np.asarray(row, dtype=np.uint8) for row in rows])
    return images[..., None] if images.ndim == 3 else images


def as_features(rows: Sequence, config_name: str, batch_size: int = 32) -> torch.Tensor:
    """(N, D) float64 features of a module's rows: the vectors themselves, or the InceptionV3 features of images."""
    if config_name == "images":
        from diffusers_flat.metrics.fid import FID

        return FID(batch_size=batch_size, show_progress=False).features_of(as_uint8_images(rows)).double()
    return torch.tensor(np.asarray(rows, dtype=np.float64))
