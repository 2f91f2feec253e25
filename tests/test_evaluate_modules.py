"""The metrics as `evaluate` modules (`evaluate.load("evaluate_modules/<name>")`, offline): each against an
independent computation in the test (the Fréchet distance of two Gaussians' sample statistics written out, a
hand-written unbiased MMD, precision/recall and memorization of toy configurations worked out by hand), and the
"images" configuration against the library's own `FID` on the same images."""

import doctest
import importlib.util

import evaluate
import numpy as np
import pytest
import torch
from conftest import REPO
from helpers import PooledPixels, unbiased_mmd
from scipy import linalg

import diffusers_flat.metrics.fid
from diffusers_flat.metrics.fid import FID


def load(name: str, config: str | None = None):
    return evaluate.load(str(REPO / "evaluate_modules" / name), config)


def test_fid_of_two_gaussians_is_the_closed_form_of_their_sample_statistics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(300, 6)) @ np.diag([0.5, 1, 1, 2, 1, 1]) + 0.3
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    closed_form = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * linalg.sqrtm(s_a @ s_b).real)
    assert load("fid").compute(predictions=b, references=a)["fid"] == pytest.approx(closed_form, rel=1e-6)


def test_kid_is_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(120, 5)), rng.normal(0.4, 1.0, size=(120, 5))
    # one subset holding every feature: the estimate of the whole sets, whatever the draw
    result = load("kid").compute(predictions=b, references=a, subsets=1, subset_size=120)
    assert result["kid"] == pytest.approx(unbiased_mmd(b, a), rel=1e-6)


def test_precision_and_recall_of_a_toy_configuration_worked_out_by_hand():
    # k = 1 (as many of each: evaluate pairs the rows). Real radii: 1 for every point (the unit square's corners,
    # and the pair (10, 10), (10, 11)).
    real = [[0, 0], [1, 0], [0, 1], [1, 1], [10, 10], [10, 11]]
    a, b, c, d, e, f = [0.5, 0.5], [1, 1.9], [4, 4], [4, 5], [0.2, 0.1], [20, 20]
    # Precision: a is 0.71 from (0, 0), b 0.9 from (1, 1), e 0.22 from (0, 0): inside; c (4.24 from (1, 1)), d (5)
    # and f (13.45 from (10, 11)): outside. 3 of 6.
    # Generated radii: a and e 0.5 (each other), b 1.49 (to a), c and d 1 (each other), f 21.93 (to d).
    # Recall: (0, 0) is 0.22 from e, (0, 1) 1.35 from b, (1, 1) 0.9 from b, (10, 10) and (10, 11) 14.1 and 13.5 from
    # f: inside; (1, 0) is 0.71 from a, 0.81 from e, 1.9 from b: outside. 5 of 6.
    result = load("precision_recall").compute(predictions=[a, b, c, d, e, f], references=real, k=1)
    assert result == {"precision": pytest.approx(3 / 6), "recall": pytest.approx(5 / 6), "k": 1}


def test_memorization_of_a_copy_and_of_a_new_image():
    training = np.stack([np.full((4, 4), value, dtype=np.uint8) for value in (0, 100, 200, 250)])
    copy = training[1]
    # halfway between 0 and 100: as close to one as to the other, not a copy of either
    new = np.full((4, 4), 50, dtype=np.uint8)
    result = load("memorization").compute(predictions=[copy, new, new], training=training)
    assert result["memorization_ratio"] == pytest.approx(1 / 3)
    assert (result["num_generated"], result["num_training"]) == (3, 4)


def test_the_images_configuration_is_the_librarys_fid_and_kid(monkeypatch):
    monkeypatch.setattr(diffusers_flat.metrics.fid, "InceptionFeatures", lambda dtype="float32": PooledPixels())
    rng = np.random.default_rng(2)
    real = rng.integers(0, 256, size=(110, 8, 8, 1), dtype=np.uint8)
    generated = np.clip(real.astype(int) + rng.integers(-40, 40, size=real.shape), 0, 255).astype(np.uint8)
    ours = FID(PooledPixels(), show_progress=False, kid_subsets=10, kid_subset_size=50)
    ours.set_real(real)
    expected = ours.scores(generated, seed=3)
    images = {"predictions": list(generated[..., 0]), "references": list(real[..., 0])}  # grayscale, as PIL takes it
    assert load("fid", "images").compute(**images)["fid"] == pytest.approx(expected["fid"], abs=1e-6)
    kid = load("kid", "images").compute(**images, subsets=10, subset_size=50, seed=3)
    assert kid["kid"] == pytest.approx(expected["kid"]["mean"], abs=1e-6)
    features = [PooledPixels()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy() for x in (generated, real)]
    by_features = load("precision_recall").compute(predictions=features[0], references=features[1])
    assert load("precision_recall", "images").compute(**images) == by_features


@pytest.mark.parametrize("name", ["fid", "kid", "precision_recall", "memorization"])
def test_the_modules_examples_run(name, monkeypatch):
    """Each module's documented example, run as a doctest from the checkout (the paths are relative to it)."""
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location(name, REPO / "evaluate_modules" / name / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    test = doctest.DocTestParser().get_doctest(module._KWARGS_DESCRIPTION, {"evaluate": evaluate}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and test.examples
