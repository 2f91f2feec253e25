"""Learned variance and the hybrid loss of improved DDPM (Nichol & Dhariwal 2021), as guided-diffusion trains ADM.

A learned-variance UNet outputs 2C channels: epsilon, then v in [-1, 1], which sets the log-variance of
p(x_{t-1} | x_t) between the posterior's log beta~_t and log beta_t. diffusers samples such a model as it is
(`DDPMScheduler(variance_type="learned_range")` splits the output and interpolates the same way), but ships no loss
for the variance: the variational-bound term is written here.

    L_hybrid = L_simple + (T / 1000) L_vlb

L_vlb at t > 0 is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), at t = 0 the discretised Gaussian decoder's negative
log-likelihood, both in bits per dimension, with the predicted mean held fixed (stop-gradient) so that L_vlb trains
the variance only; T / 1000 is guided-diffusion's rescaling (without it the bound term swamps L_simple).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler


def predicted_mean_part(prediction: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The first C channels of a UNet's output for a C-channel `sample`: all of it for a fixed-variance model, the
    epsilon half for a learned-variance one."""
    return prediction[:, : sample.shape[1]]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF as improved-/guided-diffusion compute it, a tanh approximation (Page 1977), so that the
    recipe's t = 0 term is theirs (the exact CDF changes that term by about 0.3% and its gradient on v by 4-13%):

        Phi(x) ~ (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) / 2
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(the 8-bit pixel bin of x) under N(mean, e^(2 log_scale)), per element, in nats, with the references'
    approximate CDF. x in [-1, 1] on the 256 levels; bins are 2/255 wide, the outermost ones open to +-infinity."""
    centred, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1 / 255))
    cdf_minus = approx_standard_normal_cdf(inv_std * (centred - 1 / 255))
    log_below, log_above = torch.log(cdf_plus.clamp(min=1e-12)), torch.log((1 - cdf_minus).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, log_bin))


def vlb_term(
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    epsilon: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """The variational-bound term L_{t-1} of each sample, in bits per dimension.

    Args:
        scheduler: the training scheduler (its betas over all T steps).
        clean: x_0, in [-1, 1].
        noisy: x_t.
        timesteps: t of each sample.
        epsilon: the predicted noise (detach it to train only the variance, as the hybrid loss does).
        v: the predicted variance interpolation, in [-1, 1].
    """
    device, shape = noisy.device, (-1,) + (1,) * (noisy.ndim - 1)

    def at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values.to(device)[t].view(shape)

    # float64 from the betas, as guided-diffusion computes them (the scheduler's float32 cumulative product is off by
    # up to 1e-3 relative in 1 - abar_t at small t)
    betas = scheduler.betas.double()
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    beta, abar, abar_prev = at(betas, timesteps), at(alphas_cumprod, timesteps), at(alphas_cumprod_prev, timesteps)
    # q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta~_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    c0, ct = beta * abar_prev.sqrt() / (1 - abar), (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    # beta~_0 = 0: its log is clipped to log beta~_1, as guided-diffusion does.
    log_posterior = at(torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])), timesteps)
    x0, xt = clean.double(), noisy.double()
    true_mean = c0 * x0 + ct * xt
    # p(x_{t-1} | x_t): mean from the predicted x_0, log-variance frac log beta_t + (1 - frac) log beta~_t
    predicted_x0 = (xt - (1 - abar).sqrt() * epsilon.double()) / abar.sqrt()
    model_mean = c0 * predicted_x0 + ct * xt
    frac = (v.double() + 1) / 2
    model_logvar = frac * torch.log(beta) + (1 - frac) * log_posterior

    kl = normal_kl(true_mean, log_posterior, model_mean, model_logvar).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
    return (torch.where(timesteps == 0, nll, kl) / math.log(2)).float()


def hybrid_loss(
    scheduler: DDPMScheduler,
    prediction: torch.Tensor,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """L_simple + (T / 1000) L_vlb of each sample, from the UNet's 2C-channel `prediction` (epsilon, v)."""
    epsilon, v = prediction.float().chunk(2, dim=1)
    mse = (epsilon - noise.float()).pow(2).flatten(1).mean(1)
    # The bound trains the variance only: the mean enters it with its gradient stopped.
    vlb = vlb_term(scheduler, clean, noisy, timesteps, epsilon.detach(), v)
    return mse + vlb * scheduler.config.num_train_timesteps / 1000
