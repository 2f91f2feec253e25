"""The Hub: model cards and pushing a run."""
