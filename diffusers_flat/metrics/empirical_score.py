"""The smoothed empirical denoiser: the closed-form epsilon prediction of a training set smoothed by the forward
process, with a softmax temperature that trades memorization for generalization (arXiv 2601.19285; SPEC section 5).

At timestep t the forward process turns the training set {mu_j} into the mixture (1/N) sum_j N(sqrt(abar_t) mu_j,
(1 - abar_t) I). Its posterior mean of x0 given x is sum_j w_j mu_j with

    w = softmax_j(-||x - sqrt(abar_t) mu_j||^2 / (2 (1 - abar_t) T)),

and the epsilon prediction is (x - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t): with T = 1 the exact score of the
smoothed empirical distribution, whose samples are training images; a larger T spreads the weights. The
noise-unconditional variant takes the mixture over training points and K noise levels together, (1/(N K)) sum_j sum_i
N(sqrt(abar_i) mu_j, (1 - abar_i) I), and predicts the posterior mean of epsilon over both indices: what a network
without a time input, trained with the epsilon loss, would learn on this training set.

It is a diffusers model: `sample_images`, DDPMPipeline and the PF-ODE sample it like a UNet, on any device, and
`save_pretrained` / `from_pretrained` store it (training images and schedule as safetensors buffers).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_flat.errors import FlatError


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise FlatError(f"temperature must be > 0 (1: the exact empirical score), got {temperature}", "temperature")


class EmpiricalDenoiser(ModelMixin, ConfigMixin):
    """The training set's smoothed empirical denoiser, as a diffusers model with UNet2DModel's call signature.

    Args:
        sample_size: the images' height and width.
        in_channels: their channels.
        num_images: N, the training images it holds (set by `from_training_set`).
        num_train_timesteps: the length of the noise schedule it holds.
        temperature: T > 0 of the softmax; 1 is the exact empirical score.
        noise_unconditional: weigh training points and noise levels together, ignoring the timestep.
        noise_levels: K, the training timesteps (evenly spaced) the noise-unconditional mixture spans.
        chunk_size: training images per chunk: memory is batch x chunk, never N x N.

    Example:
        >>> from diffusers import DDPMScheduler
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
    ):
        super().__init__()
        check_temperature(temperature)
        for name, value in (("num_images", num_images), ("noise_levels", noise_levels), ("chunk_size", chunk_size)):
            if value < 1:
                raise FlatError(f"{name} must be >= 1, got {value}", name)
        self.register_buffer("images", torch.zeros(num_images, in_channels * sample_size**2))  # mu_j, flattened
        self.register_buffer("alphas_cumprod", torch.zeros(num_train_timesteps, dtype=torch.float64))

    @classmethod
    def from_training_set(
        cls, images: torch.Tensor, scheduler: DDPMScheduler, temperature: float = 1.0, **config
    ) -> EmpiricalDenoiser:
        """The denoiser of `images` (N, C, H, W in [-1, 1], as the training script feeds them) under `scheduler`'s
        noise schedule; `config` sets the other arguments of the class."""
        if images.ndim != 4 or images.shape[2] != images.shape[3] or len(images) == 0:
            raise FlatError(f"images must be (N, C, H, W) with N >= 1 and H = W, got {tuple(images.shape)}", "images")
        n, channels, size, _ = images.shape
        model = cls(size, channels, n, len(scheduler.alphas_cumprod), temperature, **config)
        model.images.copy_(images.flatten(1))
        model.alphas_cumprod.copy_(scheduler.alphas_cumprod.double())
        return model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True):
        """Epsilon for `sample` (B, C, H, W) at `timestep` (a scalar or one per sample), in the sample's dtype."""
        batch = sample.shape[0]
        x = sample.flatten(1).double()  # float64: ||x - a mu||^2 is a difference of large, nearly equal terms
        if self.config.noise_unconditional:
            eps = self._unconditional_epsilon(x)
        else:
            t = torch.as_tensor(timestep, device=sample.device).long().expand(batch)
            abar = self.alphas_cumprod[t]
            a, v = abar.sqrt()[:, None], (1 - abar)[:, None]
            # logits of the pairs (x, mu_j): -||x - a mu_j||^2 / (2 v T); no level term, one level per sample
            x0_hat, _ = self._softmax_mean(x, [(a, v, torch.zeros_like(v))])
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
            mixture.append((a, v, -d / 2 * v.log()))  # the Gaussian's normaliser differs between levels
        # sum_ji w_ji (x - a_i mu_j) / sqrt(v_i) = x sum_ji w_ji / sqrt(v_i) - sum_ji w_ji (a_i / sqrt(v_i)) mu_j
        weighted_mu, weight_per_sd = self._softmax_mean(x, mixture, scale_by=lambda a, v: (a / v.sqrt(), 1 / v.sqrt()))
        return x * weight_per_sd - weighted_mu

    def _softmax_mean(self, x, mixture, scale_by=lambda a, v: (1.0, 1.0)):
        """Over chunks of training images and the mixture's levels (a, v, log-normaliser), an online softmax of the
        tempered logits (log-normaliser - ||x - a mu_j||^2 / (2 v)) / T: returns sum w c_mu mu_j and sum w c_1, with
        (c_mu, c_1) = scale_by(a, v) per level. Memory is batch x chunk."""
        temperature = self.config.temperature
        norm_x = (x * x).sum(1, keepdim=True)
        running_max = torch.full((len(x), 1), -torch.inf, dtype=x.dtype, device=x.device)
        total = torch.zeros_like(running_max)
        weighted_mu, weighted_one = torch.zeros_like(x), torch.zeros_like(running_max)
        for chunk in self.images.split(self.config.chunk_size):
            mu = chunk.double()
            norm_mu = (mu * mu).sum(1)[None]
            cross = x @ mu.T
            for a, v, log_normaliser in mixture:
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
