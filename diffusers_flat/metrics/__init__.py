"""Metrics of a trained model: FID/KID, flatness (LPF, perturbation, loss surface), exposure bias, memorization,
the probability flow distance and the empirical denoiser it compares against."""
