"""Evaluating one run: the metrics it names, its report, tables and plots."""
