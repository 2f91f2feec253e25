"""One optimisation step of a DDPM under `accelerate`: plain, SAM's two passes or a cheap SAM mode's one, with gradient
accumulation.

`train_flat_ddpm.py` calls `draw_step_noise` and `train_step` once per optimizer step; they are here, not in the
script, so the tests can run exactly the step the script runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from diffusers_flat.errors import FlatError
from diffusers_flat.methods.input_perturbation import noisy_input_and_target
from diffusers_flat.methods.learned_variance import hybrid_loss
from diffusers_flat.methods.sam import SAM_ASCENT_MODES
from diffusers_flat.methods.sam_modes import SAMMode
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.utils.seeding import dropout_seed, step_noise_generator


@dataclass
class MicroBatch:
    """Everything one forward pass needs, fixed before the step so that both SAM passes see the same batch."""

    clean: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    perturbation: torch.Tensor | None = None  # DDPM-IP's gamma * xi, or None
    weights: torch.Tensor | None = None  # importance weights 1 / (T p_t) of a non-uniform timestep sampler, or None


@dataclass
class StepStats:
    """What one optimizer step measured, averaged over all processes."""

    loss: float
    grad_norm: float
    sharpness: float | None = None  # SAM only: L(w + e) - L(w) on the step's batch
    timesteps: torch.Tensor | None = None  # with `gather_sample_losses`: every process's timesteps, in rank order
    sample_losses: torch.Tensor | None = None  # and the unweighted loss of each of those samples at w


def draw_step_noise(
    seed: int,
    step: int,
    num_samples: int,
    sample_shape: tuple[int, ...],
    num_train_timesteps: int,
    input_perturbation: float = 0.0,
    timestep_probabilities: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The noise, timesteps and (for IP, `input_perturbation` = gamma > 0) the input perturbation gamma * xi of every
    sample of a global step, a pure function of `(seed, step)` and the `timestep_probabilities` (uniform when None).
    Each rank slices its own rows, the same way `StepBatchSampler` slices the images."""
    generator = step_noise_generator(seed, step)
    noise = torch.randn((num_samples, *sample_shape), generator=generator)
    if timestep_probabilities is None:
        timesteps = torch.randint(0, num_train_timesteps, (num_samples,), generator=generator)
    else:
        timesteps = torch.multinomial(timestep_probabilities, num_samples, replacement=True, generator=generator)
    if not input_perturbation:
        return noise, timesteps, None
    # DDPM-IP: xi ~ N(0, I), independent of eps, scaled by gamma once, here.
    return noise, timesteps, input_perturbation * torch.randn((num_samples, *sample_shape), generator=generator)


def rank_micro_batches(
    images: Iterator[torch.Tensor],
    step_noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    batch_size: int,
    accumulation_steps: int,
    accelerator: Accelerator,
) -> list[MicroBatch]:
    """This process's micro-batches of one global step: the next batches of `images` (what `StepBatchSampler` yields
    this rank) with their rows of the step's (noise, timesteps, perturbation, weights), sliced the way
    `StepBatchSampler` slices the images: micro-batch j of rank r holds the global rows from
    (j * world_size + r) * batch_size on, one micro-batch per gradient accumulation step."""
    noise, timesteps, perturbation, weights = step_noise
    world_size, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    batches = []
    for j in range(accumulation_steps):
        rows = slice((j * world_size + rank) * batch_size, (j * world_size + rank + 1) * batch_size)
        batches.append(
            MicroBatch(
                clean=next(images).to(device),
                noise=noise[rows].to(device),
                timesteps=timesteps[rows].to(device),
                perturbation=None if perturbation is None else perturbation[rows].to(device),
                weights=None if weights is None else weights[rows].to(device),
            )
        )
    return batches


class TrainingDiverged(FlatError):
    """The loss stopped being a finite number."""


def check_finite(stats: StepStats, step: int, run: RunDirectory) -> None:
    """Stop a run whose loss (or SAM's sharpness) is no longer finite, naming its last good checkpoint."""
    if not math.isfinite(stats.loss) or not math.isfinite(stats.sharpness or 0.0):
        kept = run.checkpoints()
        raise TrainingDiverged(
            f"the loss became {stats.loss} at step {step}; stopped without saving. Last good checkpoint: "
            f"{kept[-1] if kept else 'none'}. Try a lower learning rate or SAM rho"
        )


def seed_dropout(seed: int, step: int, rank: int) -> None:
    """Seed torch's global generators, which dropout draws from, as a pure function of `(seed, step, rank)`: a resumed
    run then draws the masks a straight one would, whatever else used the generators in between (a DataLoader
    iterator, for one, draws its base seed from them)."""
    torch.manual_seed(dropout_seed(seed, step, rank))


def diffusion_loss(model: torch.nn.Module, scheduler: DDPMScheduler, batch: MicroBatch) -> torch.Tensor:
    """The denoising loss of each sample of one micro-batch: the MSE to the target, or, for a learned-variance UNet
    (twice the input's channels out), the hybrid loss L_simple + L_vlb."""
    noisy, target = noisy_input_and_target(scheduler, batch.clean, batch.noise, batch.timesteps, batch.perturbation)
    prediction = model(noisy, batch.timesteps).sample
    if prediction.shape[1] == 2 * noisy.shape[1]:
        return hybrid_loss(scheduler, prediction, batch.clean, noisy, target, batch.timesteps)
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def _accumulate_gradients(
    accelerator: Accelerator,
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    micro_batches: list[MicroBatch],
    all_reduce: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches, summing gradients of their mean (importance-weighted) loss. With
    `all_reduce`, the gradients are averaged across processes after the last micro-batch; otherwise they stay local.
    Returns the mean loss and each sample's unweighted loss."""
    total = torch.zeros((), device=accelerator.device)
    sample_losses = []
    for i, batch in enumerate(micro_batches):
        sync = all_reduce and i == len(micro_batches) - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            losses = diffusion_loss(model, scheduler, batch)
            # A non-uniform timestep sampler: weighting by 1 / (T p_t) keeps the uniform loss's expectation.
            loss = (losses if batch.weights is None else losses * batch.weights).mean() / len(micro_batches)
            accelerator.backward(loss)
        total += loss.detach()
        sample_losses.append(losses.detach())
    return total, torch.cat(sample_losses)


def _unscale_(accelerator: Accelerator, grads: list[torch.Tensor]) -> bool:
    """Divide fp16-scaled gradients by the GradScaler's scale (nothing to do without one); returns whether they are
    finite on every process. The scaler's own `unscale_` runs once per optimizer step, in `clip_grad_norm_`: this is
    for SAM's ascent pass, before it."""
    if accelerator.scaler is None:
        return True
    torch._foreach_mul_(grads, 1.0 / accelerator.scaler.get_scale())
    finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).float()
    return bool(accelerator.reduce(finite, reduction="sum").item() == accelerator.num_processes)


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: DDPMScheduler,
    micro_batches: list[MicroBatch],
    *,
    sam: SAMMode | None = None,
    step: int = 0,
    sam_ascent: str = "global",
    max_grad_norm: float = 1.0,
    gather_sample_losses: bool = False,
) -> StepStats:
    """Optimizer step `step` (0-based) over `micro_batches` (gradient accumulation when there are several).

    With `sam` (a mode of `methods/sam_modes.py`), `sam.begin(step)` says whether the step takes SAM's two passes
    (a one-pass mode has put the weights at w + e by then); `sam.ascend()` moves to w + e between them,
    `sam.adjust_` may change the descent gradient (LookSAM) and `sam.end()` puts the weights back at w. SAM's ascent
    direction comes from the all-reduced gradient (`sam_ascent="global"`, identical to one process on the global
    batch) or from each rank's own gradient (`"local"`, Foret et al.'s m-sharpness: no all-reduce in the first pass,
    a different perturbation per rank). The descent pass always all-reduces, so every rank takes the same step.
    Gradient clipping (off when `max_grad_norm <= 0`) applies to the descent gradient; the ascent step normalises its
    gradient, so global-norm clipping could not change e. Both passes draw the same dropout masks. Under fp16 the
    GradScaler's one scale serves both passes; the ascent unscales its gradient first, and a non-finite gradient in
    either pass skips the step, the weights left exactly as they were. With `gather_sample_losses`, every process
    gets every sample's timestep and loss at w (for the timestep sampler).
    """
    if sam_ascent not in SAM_ASCENT_MODES:
        raise FlatError(f"sam_ascent must be one of {SAM_ASCENT_MODES}, got {sam_ascent!r}", parameter="sam_ascent")
    two_passes = sam is not None and sam.begin(step, optimizer, accelerator.unwrap_model(model))
    # SAM's two passes must see the same dropout masks, or e and g' are measured on two different networks: the
    # random state is saved before the first pass and put back before the second.
    rng_devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices) if two_passes else nullcontext():
        all_reduce = not two_passes or sam_ascent == "global"
        loss, sample_losses = _accumulate_gradients(accelerator, model, scheduler, micro_batches, all_reduce)
    if two_passes and _unscale_(accelerator, sam.grads()):  # else: the step is skipped below, non-finite
        sam.ascend()  # w <- w + e(g)
        perturbed_loss, _ = _accumulate_gradients(accelerator, model, scheduler, micro_batches, all_reduce=True)
    if sam is not None:
        sam.adjust_(sam.grads())
    # An infinite bound measures the norm without clipping (and unscales fp16 gradients first).
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    sharpness = None
    if sam is not None and sam.end():  # back at w after SAM's second pass: it measured L(w + e) - L(w)
        sharpness = accelerator.reduce(perturbed_loss - loss, reduction="mean").item()
    optimizer.step()  # under fp16, skipped by the GradScaler when a gradient is not finite
    optimizer.zero_grad(set_to_none=True)
    if getattr(optimizer, "step_was_skipped", False):
        sharpness = None  # a skipped step measured nothing
    stats = StepStats(
        loss=accelerator.reduce(loss, reduction="mean").item(), grad_norm=float(grad_norm), sharpness=sharpness
    )
    if gather_sample_losses:
        stats.timesteps = accelerator.gather(torch.cat([b.timesteps for b in micro_batches])).cpu()
        stats.sample_losses = accelerator.gather(sample_losses).cpu()
    return stats
