"""The hybrid loss against closed forms (the KL of two Gaussians, the discretised decoder), diffusers' learned-range
sampling step against guided-diffusion's respaced posterior, and a learned-variance pipeline in plain diffusers."""

import math
import sys

import pytest
import torch
from conftest import run_command
from diffusers import DDPMScheduler
from torch.distributions import Normal, kl_divergence

from diffusers_flat.methods.learned_variance import hybrid_loss, vlb_term
from diffusers_flat.training.models import build_unet


def cosine_scheduler(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", **kwargs)


def posterior(betas: torch.Tensor, t: int, x0: torch.Tensor, xt: torch.Tensor):
    """q(x_{t-1} | x_t, x_0) from Ho et al.'s eq. 7, from the betas alone, in float64."""
    b = betas.double()
    abar = torch.cumprod(1 - b, 0)
    abar_prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    mean = (abar_prev.sqrt() * b[t] / (1 - abar[t])) * x0 + ((1 - b[t]).sqrt() * (1 - abar_prev) / (1 - abar[t])) * xt
    return mean, b[t] * (1 - abar_prev) / (1 - abar[t]), abar


def test_vlb_at_t_above_zero_is_the_kl_of_the_two_gaussians_in_bits_per_dim():
    scheduler, generator = cosine_scheduler(), torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 4)
    x0 = torch.rand(shape, generator=generator) * 2 - 1
    t = torch.tensor([5, 400, 999])
    eps, v = torch.randn(shape, generator=generator), torch.rand(shape, generator=generator) * 2 - 1
    abar = torch.cumprod(1 - scheduler.betas.double(), 0)
    xt = abar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * torch.randn(shape)
    ours = vlb_term(scheduler, x0, xt, t, eps, v)
    for i, ti in enumerate(t.tolist()):
        true_mean, true_var, abar = posterior(scheduler.betas, ti, x0[i].double(), xt[i].double())
        x0_hat = (xt[i].double() - (1 - abar[ti]).sqrt() * eps[i].double()) / abar[ti].sqrt()
        model_mean, _, _ = posterior(scheduler.betas, ti, x0_hat, xt[i].double())
        frac = (v[i].double() + 1) / 2
        model_var = torch.exp(frac * torch.log(scheduler.betas[ti].double()) + (1 - frac) * torch.log(true_var))
        kl = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, model_var.sqrt()))
        assert ours[i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-5)


def test_vlb_at_t_zero_is_the_discretised_decoder_nll():
    scheduler, generator = cosine_scheduler(), torch.Generator().manual_seed(1)
    shape = (1, 1, 3, 3)
    x0 = torch.randint(0, 256, shape, generator=generator).double() / 127.5 - 1
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # the two open edge bins
    xt, eps = x0 + 0.01 * torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    v = torch.full(shape, 0.3)
    ours = vlb_term(scheduler, x0, xt, torch.tensor([0]), eps, v).item()
    b = scheduler.betas.double()
    beta_tilde_1 = b[1] * (1 - (1 - b[0])) / (1 - (1 - b[0]) * (1 - b[1]))  # log beta~_0 is clipped to log beta~_1
    var = torch.exp(0.65 * torch.log(b[0]) + 0.35 * torch.log(beta_tilde_1))
    # t = 0: the posterior mean of x_{-1} is x0_hat itself
    mean = (xt.double() - (1 - (1 - b[0])).sqrt() * eps.double()) / (1 - b[0]).sqrt()

    def nll_bits(cdf) -> float:
        upper = torch.where(x0 > 0.999, torch.ones_like(x0), cdf((x0 + 1 / 255 - mean) / var.sqrt()))
        lower = torch.where(x0 < -0.999, torch.zeros_like(x0), cdf((x0 - 1 / 255 - mean) / var.sqrt()))
        return -torch.log(upper - lower).mean().item() / math.log(2)

    # improved-diffusion's approx_standard_normal_cdf, as its losses.py writes it
    def tanh_cdf(z):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3))))

    assert ours == pytest.approx(nll_bits(tanh_cdf), rel=1e-5)
    assert ours != pytest.approx(nll_bits(Normal(0.0, 1.0).cdf), rel=1e-4)  # the exact CDF is another number


def test_hybrid_loss_trains_the_mean_with_the_mse_only():
    scheduler = cosine_scheduler()
    shape = (4, 1, 4, 4)
    x0, noise = torch.rand(shape) * 2 - 1, torch.randn(shape)
    t = torch.tensor([0, 3, 50, 700])
    xt = scheduler.add_noise(x0, noise, t)
    prediction = torch.randn(4, 2, 4, 4, requires_grad=True)
    loss = hybrid_loss(scheduler, prediction, x0, xt, noise, t)
    loss.sum().backward()
    eps_grad, v_grad = prediction.grad.chunk(2, dim=1)
    torch.testing.assert_close(
        eps_grad, 2 * (prediction[:, :1].detach() - noise) / 16
    )  # d/d eps of the per-sample MSE
    assert v_grad.abs().sum() > 0
    mse = (prediction[:, :1].detach() - noise).pow(2).flatten(1).mean(1)
    vlb = vlb_term(scheduler, x0, xt, t, prediction[:, :1].detach(), prediction[:, 1:].detach())
    torch.testing.assert_close(loss.detach(), mse + vlb)  # T = 1000: the rescaling factor T / 1000 is 1


def test_diffusers_learned_range_step_is_the_respaced_posterior_with_the_learned_variance():
    # guided-diffusion's respacing: the kept steps get betas 1 - abar_t / abar_prev, and p(x_prev | x_t) has the
    # posterior mean at the clipped x0_hat and log-variance frac log beta_t + (1 - frac) log beta~_t.
    scheduler = cosine_scheduler(timestep_spacing="linspace")
    scheduler.set_timesteps(20)
    kept = scheduler.timesteps.tolist()
    t, t_prev = kept[3], kept[4]
    generator = torch.Generator().manual_seed(2)
    xt, output = torch.randn(2, 1, 4, 4, generator=generator), torch.randn(2, 2, 4, 4, generator=generator)
    ours = scheduler.step(output, t, xt, generator=torch.Generator().manual_seed(9)).prev_sample.double()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(9)).double()
    abar = torch.cumprod(1 - scheduler.betas.double(), 0)
    beta = 1 - abar[t] / abar[t_prev]
    beta_tilde = beta * (1 - abar[t_prev]) / (1 - abar[t])
    eps, v = output[:, :1].double(), output[:, 1:].double()
    x0_hat = ((xt.double() - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
    mean = (abar[t_prev].sqrt() * beta / (1 - abar[t])) * x0_hat + (
        (1 - beta).sqrt() * (1 - abar[t_prev]) / (1 - abar[t])
    ) * xt.double()
    frac = (v + 1) / 2
    logvar = frac * torch.log(beta) + (1 - frac) * torch.log(beta_tilde)
    torch.testing.assert_close(ours, mean + torch.exp(0.5 * logvar) * noise, rtol=1e-4, atol=1e-5)


LOAD = """
import sys
from diffusers import DDPMPipeline
pipeline = DDPMPipeline.from_pretrained(sys.argv[1])
assert pipeline.unet.config.out_channels == 2 and pipeline.scheduler.config.variance_type == "learned_range"
images = pipeline(batch_size=2, num_inference_steps=4, output_type="np").images
assert images.shape == (2, 8, 8, 1) and "diffusers_flat" not in sys.modules
print("sampled", images.min() >= 0, images.max() <= 1)
"""


def test_a_learned_variance_pipeline_samples_in_plain_diffusers(tmp_path, micro_unet_config):
    from diffusers import DDPMPipeline

    unet = build_unet(str(micro_unet_config), 8, 1, learn_sigma=True)
    assert (unet.config.in_channels, unet.config.out_channels) == (1, 2)
    DDPMPipeline(unet=unet, scheduler=cosine_scheduler()).save_pretrained(tmp_path / "pipeline")
    result = run_command([sys.executable, "-c", LOAD, str(tmp_path / "pipeline")], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sampled True True" in result.stdout
