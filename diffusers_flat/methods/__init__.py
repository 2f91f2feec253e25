"""Training methods, each the math of its paper on the line that does it: SAM/ASAM, EMA/SWA, input perturbation,
the learned variance (hybrid loss) and the loss-aware timestep sampler."""
