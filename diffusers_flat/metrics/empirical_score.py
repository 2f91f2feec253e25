"""The smoothed empirical denoiser: the closed-form epsilon prediction of a training set smoothed by the forward
process, with a softmax temperature that trades memorization for generalization (arXiv 2601.19285; SPEC section 5).

At timestep t the forward process turns the training set {mu_j} into the mixture (1/N) sum_j N(sqrt(abar_t) mu_j,
(1 - abar_t) I). Its posterior mean of x0 given x is sum_j w_j mu_j with

    w = softmax_j(-||x - sqrt(abar_t) mu_j||^2 / (2 (1 - abar_t) T_t)),

and the epsilon prediction is (x - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t): with T = 1 the exact score of the
smoothed empirical distribution, whose samples are training images; a larger T spreads the weights. Two tempering
rules:

- "collapse", the paper's: T_t = max(sigma_c / sigma_t, 1), tempered only below the collapse noise level sigma_c,
  with sigma_t = sqrt((1 - abar_t) / abar_t) the noise level of x / sqrt(abar_t) = mu + sigma_t eps (the paper's
  VE-SDE noise level); `find_collapse_sigma` finds sigma_c;
- "constant": one T at every noise level (this library's earlier form, kept under this name: it also smooths at high
  noise, where the paper's rule does not).

With `neighbours` K, the softmax runs over the K training images nearest the query x / sqrt(abar_t) only, found in
the pixels or in the features of a network the caller gives (the paper's practice; exact search here). Under the
collapse tempering, as in the paper's code, only below sigma_c: at and above it (where T_t = 1) the denoiser is the
full empirical score over every image; under a constant T, at every level. The
noise-unconditional variant takes the mixture over training points and K noise levels together, (1/(N K)) sum_j
sum_i N(sqrt(abar_i) mu_j, (1 - abar_i) I), and predicts the posterior mean of epsilon over both indices: what a
network without a time input, trained with the epsilon loss, would learn on this training set.

It is a diffusers model: `sample_images`, DDPMPipeline and the PF-ODE sample it like a UNet, on any device, and
`save_pretrained` / `from_pretrained` store it (training images and schedule as safetensors buffers; a feature
network is the caller's, given again to `from_training_set`).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_flat.errors import FlatError
from diffusers_flat.metrics.memorization import memorization_ratio

TEMPERING = ("collapse", "constant")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise FlatError(f"temperature must be > 0 (1: the exact empirical score), got {temperature}", "temperature")


def noise_level(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t): the noise level of x_t / sqrt(abar_t) = x0 + sigma_t eps."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


class EmpiricalDenoiser(ModelMixin, ConfigMixin):
    """The training set's smoothed empirical denoiser, as a diffusers model with UNet2DModel's call signature.

    Args:
        sample_size: the images' height and width.
        in_channels: their channels.
        num_images: N, the training images it holds (set by `from_training_set`).
        num_train_timesteps: the length of the noise schedule it holds.
        temperature: T > 0 of the "constant" tempering; 1 is the exact empirical score.
        noise_unconditional: weigh training points and noise levels together, ignoring the timestep.
        noise_levels: K, the training timesteps (evenly spaced) the noise-unconditional mixture spans.
        chunk_size: training images per chunk: memory is batch x chunk, never N x N.
        tempering: "constant" (T at every level) or "collapse" (the paper's T_t = max(sigma_c / sigma_t, 1)).
        collapse_sigma: sigma_c > 0, with "collapse".
        neighbours: K, the softmax over the K training images nearest the query only (with "collapse", below sigma_c
            only); None: all N.
        feature_dim: the size of the feature network's output when the neighbours are found in features
            (`from_training_set(..., feature_network=...)` sets it); None: in the pixels.

    Example:
        >>> from diffusers import DDIMScheduler, DDPMScheduler
        >>> images = torch.rand(5, 1, 8, 8) * 2 - 1
        >>> denoiser = EmpiricalDenoiser.from_training_set(images, DDPMScheduler(), temperature=1.0)
        >>> denoiser(torch.randn(2, 1, 8, 8), 500).sample.shape
        torch.Size([2, 1, 8, 8])
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int,
        in_channels: int,
        num_images: int,
        num_train_timesteps: int = 1000,
        temperature: float = 1.0,
        noise_unconditional: bool = False,
        noise_levels: int = 100,
        chunk_size: int = 4096,
        tempering: str = "constant",
        collapse_sigma: float | None = None,
        neighbours: int | None = None,
        feature_dim: int | None = None,
    ):
        super().__init__()
        check_temperature(temperature)
        for name, value in (("num_images", num_images), ("noise_levels", noise_levels), ("chunk_size", chunk_size)):
            if value < 1:
                raise FlatError(f"{name} must be >= 1, got {value}", name)
        if tempering not in TEMPERING:
            raise FlatError(f"tempering must be one of {', '.join(TEMPERING)}, got {tempering!r}", "tempering")
        if (tempering == "collapse") != (collapse_sigma is not None) or not (collapse_sigma or 1) > 0:
            raise FlatError(
                f"collapse_sigma must be a noise level > 0 with tempering collapse, only then; got {collapse_sigma}",
                "collapse_sigma",
            )
        if tempering == "collapse" and temperature != 1:
            raise FlatError(
                "temperature: the collapse tempering sets T per level; leave temperature at 1", "temperature"
            )
        if neighbours is not None and not 1 <= neighbours <= num_images:
            raise FlatError(
                f"neighbours must be from 1 to the {num_images} training images, got {neighbours}", "neighbours"
            )
        if neighbours is not None and noise_unconditional:
            raise FlatError(
                "neighbours: the noise-unconditional mixture runs over every image and level", "neighbours"
            )
        self.register_buffer("images", torch.zeros(num_images, in_channels * sample_size**2))  # mu_j, flattened
        self.register_buffer("alphas_cumprod", torch.zeros(num_train_timesteps, dtype=torch.float64))
        # the training images' features, where the neighbours are searched (with a feature network)
        self.register_buffer("features", torch.zeros(num_images, feature_dim or 0))
        self.feature_network: torch.nn.Module | None = None  # the caller's; not saved with the model

    @classmethod
    def from_training_set(
        cls,
        images: torch.Tensor,
        scheduler: DDPMScheduler,
        temperature: float = 1.0,
        feature_network: torch.nn.Module | None = None,
        **config,
    ) -> EmpiricalDenoiser:
        """The denoiser of `images` (N, C, H, W in [-1, 1], as the training script feeds them) under `scheduler`'s
        noise schedule; `feature_network` (images -> (N, F) features) finds the `neighbours` in its features instead
        of the pixels; `config` sets the other arguments of the class."""
        if images.ndim != 4 or images.shape[2] != images.shape[3] or len(images) == 0:
            raise FlatError(f"images must be (N, C, H, W) with N >= 1 and H = W, got {tuple(images.shape)}", "images")
        if feature_network is not None and config.get("neighbours") is None:
            raise FlatError("feature_network finds the neighbours: set neighbours too", "feature_network")
        n, channels, size, _ = images.shape
        features = None
        if feature_network is not None:
            with torch.no_grad():
                features = feature_network(images).flatten(1)
            config["feature_dim"] = features.shape[1]
        model = cls(size, channels, n, len(scheduler.alphas_cumprod), temperature, **config)
        model.images.copy_(images.flatten(1))
        model.alphas_cumprod.copy_(scheduler.alphas_cumprod.double())
        if features is not None:
            model.features.copy_(features)
            model.feature_network = feature_network
        return model

    def temperatures(self, abar: torch.Tensor) -> torch.Tensor:
        """T at each abar: the constant T, or the paper's max(sigma_c / sigma_t, 1)."""
        if self.config.tempering == "constant":
            return torch.full_like(abar, self.config.temperature)
        return (self.config.collapse_sigma / noise_level(abar)).clamp(min=1.0)

    def restricted(self, abar: torch.Tensor) -> torch.Tensor:
        """Whether the softmax at each abar runs over the K nearest images only: never without `neighbours`; under
        the collapse tempering only below sigma_c (sigma_t < sigma_c, the paper's code); else at every level."""
        if self.config.neighbours is None:
            return torch.zeros_like(abar, dtype=torch.bool)
        if self.config.tempering == "collapse":
            return noise_level(abar) < self.config.collapse_sigma
        return torch.ones_like(abar, dtype=torch.bool)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True):
        """Epsilon for `sample` (B, C, H, W) at `timestep` (a scalar or one per sample), in the sample's dtype."""
        batch = sample.shape[0]
        x = sample.flatten(1).double()  # float64: ||x - a mu||^2 is a difference of large, nearly equal terms
        if self.config.noise_unconditional:
            eps = self._unconditional_epsilon(x)
        else:
            t = torch.as_tensor(timestep, device=sample.device).long().expand(batch)
            abar = self.alphas_cumprod[t]
            a, v, temperature = abar.sqrt()[:, None], (1 - abar)[:, None], self.temperatures(abar)[:, None]
            near = self.restricted(abar)  # the samples whose softmax runs over their K nearest images only
            x0_hat = torch.empty_like(x)
            if not near.all():
                # logits of the pairs (x, mu_j): -||x - a mu_j||^2 / (2 v T); no level term, one level per sample
                far = ~near
                mixture = [(a[far], v[far], torch.zeros_like(v[far]), temperature[far])]
                x0_hat[far] = self._softmax_mean(x[far], mixture)[0]
            if near.any():
                x0_hat[near] = self._neighbour_mean(x[near], sample[near], a[near], v[near], temperature[near])
            eps = (x - a * x0_hat) / v.sqrt()
        eps = eps.to(sample.dtype).reshape(sample.shape)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)

    def _unconditional_epsilon(self, x: torch.Tensor) -> torch.Tensor:
        """sum over (j, i) of w_ji (x - sqrt(abar_i) mu_j) / sqrt(1 - abar_i), w a softmax over both indices of the
        tempered log-densities log N(x; sqrt(abar_i) mu_j, (1 - abar_i) I) / T."""
        steps = len(self.alphas_cumprod)
        levels = torch.linspace(0, steps - 1, self.config.noise_levels, device=x.device).round().long()
        d = x.shape[1]
        mixture = []
        for abar in self.alphas_cumprod[levels]:
            a, v = abar.sqrt().expand(len(x), 1), (1 - abar).expand(len(x), 1)
            temperature = self.temperatures(abar).expand(len(x), 1)
            mixture.append((a, v, -d / 2 * v.log(), temperature))  # the Gaussian's normaliser differs between levels
        # sum_ji w_ji (x - a_i mu_j) / sqrt(v_i) = x sum_ji w_ji / sqrt(v_i) - sum_ji w_ji (a_i / sqrt(v_i)) mu_j
        weighted_mu, weight_per_sd = self._softmax_mean(x, mixture, scale_by=lambda a, v: (a / v.sqrt(), 1 / v.sqrt()))
        return x * weight_per_sd - weighted_mu

    def _softmax_mean(self, x, mixture, scale_by=lambda a, v: (1.0, 1.0)):
        """Over chunks of training images and the mixture's levels (a, v, log-normaliser, T), an online softmax of the
        tempered logits (log-normaliser - ||x - a mu_j||^2 / (2 v)) / T: returns sum w c_mu mu_j and sum w c_1, with
        (c_mu, c_1) = scale_by(a, v) per level. Memory is batch x chunk."""
        norm_x = (x * x).sum(1, keepdim=True)
        running_max = torch.full((len(x), 1), -torch.inf, dtype=x.dtype, device=x.device)
        total = torch.zeros_like(running_max)
        weighted_mu, weighted_one = torch.zeros_like(x), torch.zeros_like(running_max)
        for chunk in self.images.split(self.config.chunk_size):
            mu = chunk.double()
            norm_mu = (mu * mu).sum(1)[None]
            cross = x @ mu.T
            for a, v, log_normaliser, temperature in mixture:
                logits = (log_normaliser - (norm_x - 2 * a * cross + a * a * norm_mu) / (2 * v)) / temperature
                new_max = torch.maximum(running_max, logits.max(1, keepdim=True).values)
                rescale = (running_max - new_max).exp()
                weights = (logits - new_max).exp()
                c_mu, c_one = scale_by(a, v)
                total = total * rescale + weights.sum(1, keepdim=True)
                weighted_mu = weighted_mu * rescale + c_mu * (weights @ mu)
                weighted_one = weighted_one * rescale + c_one * weights.sum(1, keepdim=True)
                running_max = new_max
        return weighted_mu / total, weighted_one / total

    def _neighbour_mean(self, x, sample, a, v, temperature) -> torch.Tensor:
        """sum_j w_j mu_j with the tempered softmax over the K training images nearest the query x / a only: nearest
        in the pixels (the K largest logits) or in the feature network's features of the query's image."""
        k = self.config.neighbours
        if self.config.feature_dim is None:
            query, keys = x / a, self.images.double()
        else:
            if self.feature_network is None:
                raise FlatError(
                    "feature_network: this denoiser finds neighbours in features; build it with from_training_set("
                    "..., feature_network=...)",
                    "feature_network",
                )
            with torch.no_grad():
                query = self.feature_network((x / a).to(sample.dtype).reshape(sample.shape)).flatten(1).double()
            keys = self.features.double()
        # exact search, chunk by chunk: keep the K smallest squared distances seen so far
        best = torch.full((len(x), 0), 0.0, dtype=x.dtype, device=x.device)
        best_index = torch.zeros((len(x), 0), dtype=torch.long, device=x.device)
        for start in range(0, len(keys), self.config.chunk_size):
            chunk = keys[start : start + self.config.chunk_size]
            distance = (query * query).sum(1, keepdim=True) - 2 * query @ chunk.T + (chunk * chunk).sum(1)[None]
            index = torch.arange(start, start + len(chunk), device=x.device).expand(len(x), -1)
            distance, index = torch.cat([best, distance], 1), torch.cat([best_index, index], 1)
            best, order = distance.topk(min(k, distance.shape[1]), dim=1, largest=False)
            best_index = index.gather(1, order)
        mu = self.images.double()[best_index]  # (batch, K, d)
        logits = -((x[:, None] - a[:, :, None] * mu) ** 2).sum(2) / (2 * v * temperature)
        return (logits.softmax(1)[:, :, None] * mu).sum(1)


@torch.no_grad()
def find_collapse_sigma(
    images: torch.Tensor,
    scheduler: DDPMScheduler,
    num_samples: int = 64,
    steps: int = 50,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict:
    """The collapse noise level sigma_c of a training set, for the paper's tempering: the plain empirical denoiser
    (T = 1) is sampled with DDIM (eta = 0) from `num_samples` noises; at each step the chains' current estimates of x0
    are memorized when their nearest training image is closer than 1/3 of the second nearest (the memorization
    ratio). sigma_c is the noise level sigma_t of the first step, from the noisiest, at which at least `threshold` of
    the estimates are memorized: from there down the plain denoiser copies training images.

    Returns {"collapse_sigma", "timestep", "curve": [(timestep, sigma_t, memorized fraction) per step]};
    "collapse_sigma" and "timestep" are None when the estimates never collapse.

    Example:
        >>> images = torch.rand(8, 1, 4, 4) * 2 - 1
        >>> found = find_collapse_sigma(images, DDPMScheduler(), num_samples=4, steps=10)
        >>> sorted(found)
        ['collapse_sigma', 'curve', 'timestep']
    """
    if not 0 < threshold <= 1:
        raise FlatError(f"threshold must be a fraction in (0, 1], got {threshold}", "threshold")
    denoiser = EmpiricalDenoiser.from_training_set(images, scheduler)
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((num_samples, *images.shape[1:]), generator=generator, dtype=torch.float64)
    training = images.flatten(1).double().numpy()
    curve, found = [], None
    for t in ddim.timesteps:
        out = ddim.step(denoiser(x, t).sample, t, x)  # eta = 0: deterministic
        estimates = out.pred_original_sample.flatten(1).numpy()
        memorized = memorization_ratio(estimates, training)["memorization_ratio"]
        sigma = float(noise_level(denoiser.alphas_cumprod[t]))
        curve.append((int(t), sigma, memorized))
        if found is None and memorized >= threshold:
            found = (sigma, int(t))
        x = out.prev_sample
    return {"collapse_sigma": found and found[0], "timestep": found and found[1], "curve": curve}
