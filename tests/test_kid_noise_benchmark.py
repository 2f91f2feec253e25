"""The sample-count benchmark's ΔKID (benchmarks/quantized_kid_noise.py) against KID written out by hand: the unbiased
MMD² of the quantized samples against the real images, less that of the fp32 samples (the real images' own term is the
same in both and cancels), on all samples and on a bootstrap draw with repeats."""

import importlib.util

import numpy as np
import pytest
from conftest import REPO
from helpers import unbiased_mmd


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("kid_noise", REPO / "benchmarks" / "quantized_kid_noise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_delta_kid_is_the_difference_of_the_unbiased_mmds(benchmark):
    rng = np.random.default_rng(0)
    fp32, quantized, real = rng.normal(size=(30, 6)), rng.normal(0.3, 1.2, size=(30, 6)), rng.normal(size=(25, 6))
    k = benchmark.kid_kernel
    kernels = (k(quantized, quantized), k(fp32, fp32), k(quantized, real).mean(1), k(fp32, real).mean(1))
    expected = 1e3 * (unbiased_mmd(quantized, real) - unbiased_mmd(fp32, real))
    assert benchmark.delta_kid(*kernels, np.arange(30)) == pytest.approx(expected)
    # a bootstrap draw: the resampled rows, repeats and all, treated as distinct samples, fp32 and quantized paired
    index = rng.integers(0, 30, 30)
    expected = 1e3 * (unbiased_mmd(quantized[index], real) - unbiased_mmd(fp32[index], real))
    assert benchmark.delta_kid(*kernels, index) == pytest.approx(expected)
