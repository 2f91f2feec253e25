"""Improved precision and recall (Kynkäänniemi et al. 2019) in a feature space: each set's manifold is the union of
balls around its samples, each ball reaching that sample's k-th nearest neighbour within the set. Precision is the
fraction of generated samples inside the real manifold (quality), recall the fraction of real samples inside the
generated one (coverage). torchmetrics has no such metric; written here on torch.cdist."""

from __future__ import annotations

from typing import TypedDict

import torch

from diffusers_flat.errors import FlatError


class PrecisionRecall(TypedDict):
    precision: float
    recall: float
    k: int


CHUNK = 512  # rows of each distance block: memory stays at CHUNK x N however many samples


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each sample's distance to its k-th nearest neighbour in its own set (itself excluded)."""
    # the 1st smallest distance is the sample's own, 0
    blocks = [
        torch.cdist(features[i : i + CHUNK], features).kthvalue(k + 1, dim=1).values
        for i in range(0, len(features), CHUNK)
    ]
    return torch.cat(blocks)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each point lies in some ball (centre, radius): within the manifold of `centres`."""
    blocks = [
        (torch.cdist(points[i : i + CHUNK], centres) <= radii[None, :]).any(dim=1)
        for i in range(0, len(points), CHUNK)
    ]
    return torch.cat(blocks)


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall of `generated` against `real` features ((N, D) each, float).

    Args:
        real: the real samples' features (their dtype is that of the distances).
        generated: the generated samples' features.
        k: the neighbour whose distance is each ball's radius (the paper: 3).

    Example:
        >>> real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> precision_recall(real, torch.tensor([[1.5], [10.0]]), k=1)["precision"]
        0.5
    """
    for name, features in (("real", real), ("generated", generated)):
        if features.dim() != 2 or len(features) <= k:
            raise FlatError(f"{name}: needs an (N, D) array with N > k = {k}, got shape {tuple(features.shape)}", name)
    if k < 1:
        raise FlatError(f"k must be at least 1, got {k}", "k")
    generated = generated.to(real.dtype)
    precision = _inside(generated, real, _radii(real, k)).double().mean()
    recall = _inside(real, generated, _radii(generated, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall), "k": k}
