"""The smoothed empirical denoiser against hand computations: one image, infinite temperature, a 3-point softmax
written out here, the noise-unconditional mixture, memorization at T = 1, and saving."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.datasets import load_digits

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser, find_collapse_sigma
from diffusers_flat.metrics.memorization import memorization_ratio
from diffusers_flat.sampling import flow_map, sample_images

SCHEDULER = DDPMScheduler(timestep_spacing="linspace")


def x0_of(model, x, t):
    """The x0 prediction behind an epsilon prediction: (x - sqrt(1 - abar) eps) / sqrt(abar)."""
    abar = SCHEDULER.alphas_cumprod[t].double()
    eps = model(x, t).sample.double()
    return (x.double() - (1 - abar).sqrt() * eps) / abar.sqrt()


def digits(n: int, size: int = 8) -> torch.Tensor:
    """The first n embedded digits as (n, 1, 8, 8) in [-1, 1]."""
    images = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16 * 2 - 1
    return images[:, None, :size, :size]


def test_one_training_image_is_predicted_at_every_timestep():
    image = digits(1)
    model = EmpiricalDenoiser.from_training_set(image, SCHEDULER)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in (0, 10, 500, 999):
        assert torch.allclose(x0_of(model, x, t), image.double().expand(3, -1, -1, -1), atol=1e-4), t


def test_an_infinite_temperature_predicts_the_training_mean():
    images = digits(10)
    model = EmpiricalDenoiser.from_training_set(images, SCHEDULER, temperature=1e12)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    mean = images.double().mean(0, keepdim=True).expand(2, -1, -1, -1)
    assert torch.allclose(x0_of(model, x, 300), mean, atol=1e-4)


def test_three_points_give_the_hand_computed_softmax_mean():
    points = torch.tensor([[[[0.5, -0.5], [0.0, 1.0]]], [[[-1.0, 0.2], [0.3, 0.3]]], [[[0.9, 0.9], [-0.4, 0.0]]]])
    x = torch.tensor([[[[0.2, 0.1], [-0.3, 0.6]]]])
    t, temperature = 400, 2.5
    model = EmpiricalDenoiser.from_training_set(points, SCHEDULER, temperature=temperature, chunk_size=2)
    abar = float(SCHEDULER.alphas_cumprod[t])
    distances = [
        sum((float(x.flatten()[k]) - abar**0.5 * float(p.flatten()[k])) ** 2 for k in range(4)) for p in points
    ]
    logits = [-d / (2 * (1 - abar) * temperature) for d in distances]
    weights = [np.exp(v - max(logits)) for v in logits]
    weights = [w / sum(weights) for w in weights]
    by_hand = sum(w * p.double() for w, p in zip(weights, points))
    assert torch.allclose(x0_of(model, x, t), by_hand, atol=1e-5)
    # chunking changes nothing: one image per chunk, or all at once
    whole = EmpiricalDenoiser.from_training_set(points, SCHEDULER, temperature=temperature, chunk_size=1024)
    assert torch.allclose(whole(x, t).sample, model(x, t).sample, atol=1e-6)


def test_the_collapse_tempering_is_max_of_sigma_c_over_sigma_t_and_one_by_hand():
    points = digits(5, size=2)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    sigma_c = 0.5
    model = EmpiricalDenoiser.from_training_set(points, SCHEDULER, tempering="collapse", collapse_sigma=sigma_c)
    for t in (20, 150, 700):  # sigma_t about 0.16, 0.70 and 3.9: tempered at the first level only
        abar = float(SCHEDULER.alphas_cumprod[t])
        sigma_t = ((1 - abar) / abar) ** 0.5
        temperature = max(sigma_c / sigma_t, 1.0)
        distances = [float(((x.flatten() - abar**0.5 * q.flatten()) ** 2).sum()) for q in points]
        logits = np.array([-d / (2 * (1 - abar) * temperature) for d in distances])
        weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        by_hand = sum(float(w) * q.double() for w, q in zip(weights, points))
        assert torch.allclose(x0_of(model, x, t), by_hand, atol=1e-5), t
    assert (
        max(sigma_c / ((1 - float(SCHEDULER.alphas_cumprod[20])) / float(SCHEDULER.alphas_cumprod[20])) ** 0.5, 1) > 2
    )


def test_a_collapse_level_below_every_noise_level_is_the_plain_empirical_denoiser():
    images, x = digits(20), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    plain = EmpiricalDenoiser.from_training_set(images, SCHEDULER)
    below = EmpiricalDenoiser.from_training_set(images, SCHEDULER, tempering="collapse", collapse_sigma=1e-6)
    for t in (0, 50, 999):
        assert torch.equal(below(x, t).sample, plain(x, t).sample), t


def test_all_n_neighbours_are_the_full_softmax_and_k_of_them_are_the_brute_force_k_nearest():
    images, x = digits(12), torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    full = EmpiricalDenoiser.from_training_set(images, SCHEDULER, temperature=3.0)
    every = EmpiricalDenoiser.from_training_set(images, SCHEDULER, temperature=3.0, neighbours=12, chunk_size=5)
    t = 250
    assert torch.allclose(every(x, t).sample, full(x, t).sample, atol=1e-6)
    # K = 4 by brute force: the 4 images nearest x / sqrt(abar), then the tempered softmax over them alone
    abar = SCHEDULER.alphas_cumprod[t].double()
    flat, mu = x.flatten(1).double(), images.flatten(1).double()
    nearest = torch.cdist(flat / abar.sqrt(), mu).argsort(1)[:, :4]
    expected = []
    for i in range(3):
        chosen = mu[nearest[i]]
        logits = -((flat[i] - abar.sqrt() * chosen) ** 2).sum(1) / (2 * (1 - abar) * 3.0)
        expected.append((logits.softmax(0)[:, None] * chosen).sum(0))
    four = EmpiricalDenoiser.from_training_set(images, SCHEDULER, temperature=3.0, neighbours=4, chunk_size=5)
    assert torch.allclose(x0_of(four, x, t).flatten(1), torch.stack(expected), atol=1e-5)
    assert not torch.allclose(x0_of(four, x, t), x0_of(full, x, t), atol=1e-3)  # the restriction changes the mean


def test_neighbours_in_a_feature_space_are_the_brute_force_nearest_features():
    images, x = digits(12), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))  # a small fixed random embedding
    model = EmpiricalDenoiser.from_training_set(images, SCHEDULER, feature_network=network, neighbours=3)
    t = 100
    abar = SCHEDULER.alphas_cumprod[t].double()
    flat, mu = x.flatten(1).double(), images.flatten(1).double()
    with torch.no_grad():
        keys, queries = network(images).double(), network((x.double() / abar.sqrt()).float()).double()
    nearest = torch.cdist(queries, keys).argsort(1)[:, :3]
    for i in range(2):
        chosen = mu[nearest[i]]
        logits = -((flat[i] - abar.sqrt() * chosen) ** 2).sum(1) / (2 * (1 - abar))
        by_hand = (logits.softmax(0)[:, None] * chosen).sum(0)
        assert torch.allclose(x0_of(model, x, t)[i].flatten(), by_hand, atol=1e-5)


def test_the_collapse_level_is_where_the_plain_chains_estimates_start_copying_training_images():
    images, scheduler, n = digits(10), DDPMScheduler(), 16  # "leading" spacing: DDIM steps 900, 800, ..., 0
    found = find_collapse_sigma(images, scheduler, num_samples=n, steps=10, threshold=0.5, seed=0)
    # by hand: DDIM (eta = 0) with the plain softmax mean as x0, and the memorization ratio written out
    abar = scheduler.alphas_cumprod.double()
    mu = images.flatten(1).double()
    x = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64).flatten(1)
    curve = []
    for t in range(900, -1, -100):
        a, prev = abar[t], (abar[t - 100] if t >= 100 else torch.tensor(1.0, dtype=torch.float64))
        logits = -(torch.cdist(x, a.sqrt() * mu) ** 2) / (2 * (1 - a))
        x0 = logits.softmax(1) @ mu
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        two = torch.cdist(x0, mu).sort(1).values[:, :2]
        curve.append((t, float(((1 - a) / a).sqrt()), float((two[:, 0] < two[:, 1] / 3).double().mean())))
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    assert [(t, f) for t, _, f in found["curve"]] == [(t, pytest.approx(f)) for t, _, f in curve]
    first = next(step for step in curve if step[2] >= 0.5)
    assert 0 < first[0] < 900  # collapses on the way, not at the first or the last step
    assert (found["timestep"], found["collapse_sigma"]) == (first[0], pytest.approx(first[1]))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"tempering": "collapse"}, "collapse_sigma must be a noise level > 0 with tempering collapse"),
        ({"collapse_sigma": 1.0}, "collapse_sigma must be a noise level > 0 with tempering collapse"),
        ({"tempering": "warm"}, "tempering must be one of collapse, constant, got 'warm'"),
        ({"neighbours": 0}, "neighbours must be from 1 to the 3 training images, got 0"),
        ({"neighbours": 2, "noise_unconditional": True}, "neighbours: the noise-unconditional mixture"),
    ],
)
def test_bad_tempering_or_neighbours_are_refused_naming_the_parameter(config, message):
    with pytest.raises(FlatError, match=message):
        EmpiricalDenoiser.from_training_set(digits(3), SCHEDULER, **config)


def test_the_noise_unconditional_mixture_weighs_points_and_levels_together():
    points = digits(3, size=2)  # 3 points of 4 pixels
    model = EmpiricalDenoiser.from_training_set(points, SCHEDULER, noise_unconditional=True, noise_levels=3)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    levels = [0, 500, 999]  # three levels spread over the 1,000 training timesteps
    terms, logits = [], []
    for level in levels:
        abar = SCHEDULER.alphas_cumprod[level].double()
        for p in points.double():
            gap = x.double() - abar.sqrt() * p  # x - a_i mu_j
            # log N(x; a_i mu_j, v_i I) up to a constant: -(d / 2) log v_i - ||x - a_i mu_j||^2 / (2 v_i)
            logits.append(-2 * (1 - abar).log() - (gap**2).sum((1, 2, 3)) / (2 * (1 - abar)))
            terms.append(gap / (1 - abar).sqrt())
    weights = torch.softmax(torch.stack(logits, 1), 1)
    by_hand = sum(weights[:, k, None, None, None] * terms[k] for k in range(len(terms)))
    for t in (0, 700):  # the timestep is ignored
        assert torch.allclose(model(x, t).sample.double(), by_hand, atol=1e-5)


def test_temperature_one_reproduces_training_images_and_warmer_ones_memorize_less():
    images = digits(12)
    as_uint8 = np.round((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)
    cold = EmpiricalDenoiser.from_training_set(images, SCHEDULER)
    ode = flow_map(cold, SCHEDULER.config, 16, steps=50, show_progress=False)
    ode_uint8 = np.round((ode.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)
    nearest = [np.abs(ode_uint8[i].astype(int) - as_uint8.astype(int)).max(axis=(1, 2, 3)).min() for i in range(16)]
    assert max(nearest) <= 1  # every PF-ODE sample is a training image, within rounding
    assert memorization_ratio(ode_uint8, as_uint8)["memorization_ratio"] == 1.0
    ddpm = sample_images(cold, SCHEDULER, 16, 100, show_progress=False)
    assert memorization_ratio(ddpm, as_uint8)["memorization_ratio"] == 1.0
    # the distances between 8x8 digits are large against the last steps' noise: T must reach ~1e4 to spread them
    ratios = []
    for temperature in (1.0, 1e2, 1e4, 1e6):
        model = EmpiricalDenoiser.from_training_set(images, SCHEDULER, temperature=temperature)
        ratios.append(memorization_ratio(sample_images(model, SCHEDULER, 16, 100, show_progress=False), as_uint8))
    ratios = [r["memorization_ratio"] for r in ratios]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] == 1.0 > ratios[-1], ratios


def test_a_saved_denoiser_loads_back_and_predicts_bit_for_bit(tmp_path):
    model = EmpiricalDenoiser.from_training_set(digits(7), SCHEDULER, temperature=3.0, chunk_size=3)
    model.save_pretrained(tmp_path / "empirical")
    assert (tmp_path / "empirical" / "diffusion_pytorch_model.safetensors").exists()
    loaded = EmpiricalDenoiser.from_pretrained(tmp_path / "empirical")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(x, 123).sample, model(x, 123).sample)
    assert loaded.config.temperature == 3.0 and loaded.alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_a_temperature_at_or_below_zero_is_refused(temperature):
    with pytest.raises(
        FlatError, match=f"temperature must be > 0 \\(1: the exact empirical score\\), got {temperature}"
    ):
        EmpiricalDenoiser.from_training_set(digits(2), SCHEDULER, temperature=temperature)


def test_under_the_collapse_tempering_the_neighbours_restrict_the_softmax_below_sigma_c_only():
    # the paper's code: above sigma_c the full empirical score over every image, below it the tempered softmax over
    # the K nearest. sigma_c = 0.5; t = 20 is below it (sigma_t ~ 0.16), t = 150 and 700 above (0.70, 3.9)
    images = digits(12)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    config = {"tempering": "collapse", "collapse_sigma": 0.5, "chunk_size": 5}
    near = EmpiricalDenoiser.from_training_set(images, SCHEDULER, neighbours=4, **config)
    full = EmpiricalDenoiser.from_training_set(images, SCHEDULER, **config)
    for t in (150, 700):
        assert torch.equal(near(x, t).sample, full(x, t).sample), t
    t = 20
    abar = SCHEDULER.alphas_cumprod[t].double()
    temperature = 0.5 / ((1 - abar) / abar).sqrt()  # max(sigma_c / sigma_t, 1) > 1 here
    flat, mu = x.flatten(1).double(), images.flatten(1).double()
    nearest = torch.cdist(flat / abar.sqrt(), mu).argsort(1)[:, :4]
    expected = []
    for i in range(3):
        chosen = mu[nearest[i]]
        logits = -((flat[i] - abar.sqrt() * chosen) ** 2).sum(1) / (2 * (1 - abar) * temperature)
        expected.append((logits.softmax(0)[:, None] * chosen).sum(0))
    assert torch.allclose(x0_of(near, x, t).flatten(1), torch.stack(expected), atol=1e-5)
    # one batch across the boundary: each sample takes its own level's rule
    mixed = near(x, torch.tensor([20, 150, 700])).sample
    for i, t in enumerate((20, 150, 700)):
        assert torch.allclose(mixed[i], near(x[i : i + 1], t).sample[0], atol=1e-6)
