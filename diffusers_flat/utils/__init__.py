"""Helpers shared by every layer: command-line plumbing, sampling, seed streams."""
