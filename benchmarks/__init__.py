"""Benchmarks of the training step and the sweep (see BENCHMARKS.md); run them as scripts from the repository root."""
