"""Importance sampling of training timesteps by the loss's second moment (Nichol & Dhariwal 2021), as ADM trains.

No maintained library carries it for diffusers (guided-diffusion's `LossSecondMomentResampler` is research code), so
it is written here. The hybrid loss's bound term varies over orders of magnitude across t; sampling t with
probability p_t proportional to sqrt(E[L_t^2]) and weighting each sample by 1 / (T p_t) keeps the loss's expectation
and lowers its variance.
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


class LossSecondMomentSampler:
    """Timestep probabilities p_t proportional to sqrt(mean of the last `history` losses squared at t), mixed with
    `uniform_prob` of the uniform distribution; uniform until every t has `history` losses.

    The state lives on the CPU and is updated with the losses of every process (the same on all ranks); it is saved
    with a training checkpoint (`state_dict`).

    Args:
        num_timesteps: T.
        history: losses kept per timestep (guided-diffusion: 10).
        uniform_prob: the uniform share of p (guided-diffusion: 0.001).

    Example:
        >>> sampler = LossSecondMomentSampler(4, history=1)
        >>> sampler.update(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 1.0, 3.0]))
        >>> sampler.probabilities().round(decimals=3).tolist()
        [0.167, 0.167, 0.167, 0.5]
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps, self.history, self.uniform_prob = num_timesteps, history, uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t, a float64 CPU tensor of length T."""
        uniform = torch.full((self.num_timesteps,), 1 / self.num_timesteps, dtype=torch.float64)
        if not self.warmed_up:
            return uniform
        p = self.losses.pow(2).mean(dim=1).sqrt()  # sqrt(E[L_t^2])
        return (1 - self.uniform_prob) * p / p.sum() + self.uniform_prob * uniform

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the (unweighted) loss of each sample at its timestep, oldest out first."""
        for t, loss in zip(timesteps.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[t] == self.history:
                self.losses[t] = torch.roll(self.losses[t], -1)
                self.losses[t, -1] = loss
            else:
                self.losses[t, self.counts[t]] = loss
                self.counts[t] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def importance_weights(probabilities: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """1 / (T p_t) for each sampled t: the weights that make a loss at t ~ p an unbiased estimate of the loss at
    uniform t (float32, on the timesteps' device)."""
    weights = 1 / (len(probabilities) * probabilities[timesteps.cpu()])
    return weights.float().to(timesteps.device)
