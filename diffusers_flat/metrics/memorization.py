"""Memorization ratio (Yoon et al. 2023; Gu et al. 2023): a generated image counts as memorized when its nearest
training image is closer than 1/3 of the distance to the second nearest (L2 in pixel space)."""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from diffusers_flat.errors import FlatError


def nearest_training_images(
    generated: np.ndarray, training: np.ndarray, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """For each generated image, the indices and L2 distances of its two nearest training images (both (N, 2))."""
    if len(training) < 2:
        raise FlatError("training: the memorization ratio needs at least 2 training images", parameter="training")
    train = torch.from_numpy(training.reshape(len(training), -1).astype(np.float32))
    indices, distances = [], []
    for start in range(0, len(generated), batch_size):
        gen = torch.from_numpy(generated[start : start + batch_size].reshape(-1, train.shape[1]).astype(np.float32))
        d, i = torch.cdist(gen, train).topk(2, dim=1, largest=False)
        indices.append(i.numpy())
        distances.append(d.numpy())
    return np.concatenate(indices), np.concatenate(distances)


class MemorizationResult(TypedDict):
    memorization_ratio: float
    num_generated: int
    num_training: int
    threshold: float
    # the data's own ratio: as many held-out real images against the same training images (None: no held-out split)
    held_out_ratio: float | None


def memorization_ratio(generated: np.ndarray, training: np.ndarray, threshold: float = 1 / 3) -> dict:
    """The fraction of generated images whose nearest training image is closer than `threshold` times the second
    nearest; also each image's nearest training index, for showing them side by side."""
    indices, distances = nearest_training_images(generated, training)
    memorized = distances[:, 0] < threshold * distances[:, 1]
    return {
        "memorization_ratio": float(memorized.mean()),
        "num_generated": len(generated),
        "num_training": len(training),
        "threshold": threshold,
        "nearest": indices[:, 0].tolist(),
        "memorized": memorized.tolist(),
    }
