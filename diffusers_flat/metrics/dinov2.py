"""DINOv2 features, a second feature space for FID, KID and precision/recall (FD_DINOv2: Stein et al. 2023 find it
ranks generative models closer to human judgement than InceptionV3; EDM2 reports it beside FID). Through
`transformers`' `AutoModel`; the preprocessing is dgm-eval's: bicubic resize to 224x224, ImageNet normalisation, and
the class token of the last (layer-normalised) hidden state."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusers_flat.errors import FlatError

DEFAULT_DINOV2 = "facebook/dinov2-large"  # ViT-L/14, 1,024-d features
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images (1 or 3 channels, any size) -> the network's float input: RGB in [0, 1], resized bicubically
    to 224x224 (clamped back to [0, 1]), normalised with ImageNet's mean and standard deviation."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise FlatError(
            f"images: expected uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}", "images"
        )
    x = images.float().expand(-1, 3, -1, -1) / 255
    if x.shape[-2:] != (DINOV2_SIZE, DINOV2_SIZE):
        x = F.interpolate(x, size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


class DINOv2Features(torch.nn.Module):
    """uint8 NCHW images -> the class-token features of a DINOv2 model (`hidden_size` of them, 1,024 for ViT-L/14).

    Args:
        model: a `transformers` DINOv2 model (`Dinov2Model`); `DINOv2Features.from_pretrained` loads one.
        name: what the features are called in results and cache keys.

    Example:
        >>> from transformers import Dinov2Config, Dinov2Model
        >>> config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        >>> features = DINOv2Features(Dinov2Model(config), "tiny")
        >>> features(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([2, 32])
    """

    def __init__(self, model: torch.nn.Module, name: str):
        super().__init__()
        self.network = model.eval().requires_grad_(False)
        self.num_features = model.config.hidden_size
        self.key = f"dinov2:{name}"

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_DINOV2) -> DINOv2Features:
        """The DINOv2 model of a Hub id or a local directory; offline with no weights: one line saying how to get
        them."""
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(name_or_path)
        except OSError:
            raise FlatError(
                f"dinov2_model {name_or_path}: no DINOv2 weights found (offline, or not a DINOv2 directory); "
                f"download them once where the Hub is reachable (hf download {DEFAULT_DINOV2}) or give the "
                "directory of a local copy",
                "dinov2_model",
            ) from None
        return cls(model, name_or_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.network(pixel_values=dinov2_pixels(images).to(self.network.dtype))
        return output.pooler_output.float()
