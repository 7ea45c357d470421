"""What an evaluation attack returns, and the guard that keeps the model untouched."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttackOutput:
    """Adversarial images (B, 3, H, W) in [0, 1]; adversarial captions, or None if texts are untouched.

    ``text_source`` names the candidate source of a text attack (recorded with results).
    """

    images: torch.Tensor
    captions: list[tuple[str, ...]] | None = None
    text_source: str | None = None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every submodule of ``model`` in eval mode, then restore each one's own mode.

    Attacks and evaluation must not update BatchNorm running statistics nor sample
    dropout (``open_clip:RN50``/``RN101`` have BatchNorm); each module's flag is restored,
    not just the top one, so a partly frozen model comes back exactly as it was.
    """
    was_training = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in was_training:
            module.train(training)


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Run an attack with the model in eval mode and no parameter gradients, then restore both.

    Attacks only need input gradients; restoring ``training`` and ``requires_grad``
    keeps the contract "model weights and train/eval mode unchanged afterwards".
    """
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        with eval_mode(model):
            yield
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)


def caption_centroids(model, captions: list[tuple[str, ...]]) -> torch.Tensor:
    """(B, D): for each image the mean of its *normalised* caption features.

    ``normalize(f) · centroid`` is the mean cosine of f to the image's captions, so one
    dot product scores all captions however many an image has.
    """
    flat = [caption for group in captions for caption in group]
    with torch.no_grad():
        features = F.normalize(model.encode_text(flat), dim=-1)
    sizes = [len(group) for group in captions]
    return torch.stack([chunk.mean(dim=0) for chunk in features.split(sizes)])


def retrieval_loss(image_features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per-image ``1 - mean cosine`` to its own captions: the loss an image attack maximises."""
    return 1.0 - (F.normalize(image_features, dim=-1) * centroids).sum(dim=-1)
