"""Evaluation: image-text retrieval recall (clean and under attack) and captioning metrics."""
