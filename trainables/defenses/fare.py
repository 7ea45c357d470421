"""FARE (Schlarmann et al., ICML 2024): unsupervised feature-alignment adversarial fine-tuning.

Loss (maximised by the inner PGD, minimised by the outer step, as in the Robust CLIP
code): ``||F(v') - F_org(v)||_2^2`` on **raw** embeddings, summed over dims.
"""

from __future__ import annotations

import torch

from trainables.defenses.distances import squared_l2


def fare_loss(adversarial_features: torch.Tensor, original_features: torch.Tensor) -> torch.Tensor:
    """Per-image FARE loss: (B, D), (B, D) -> (B,)."""
    return squared_l2(adversarial_features, original_features)


def fare_outer_loss(adversarial_features: torch.Tensor, original_features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch mean of the FARE loss, named for logging."""
    loss = fare_loss(adversarial_features, original_features).mean()
    return {"loss": loss, "l_fare": loss}
