"""Per-sample distances shared by the defenses (no reduction over the batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_l2(a: torch.Tensor, b: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """``||a - b||_2^2`` summed over the last dim, one value per leading index.

    Args:
        a, b: (..., D) embeddings, broadcastable.
        normalized: L2-normalise both first (the MAVA authors' code does; FARE and the paper do not).
    """
    if normalized:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).pow(2).sum(dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim (broadcasting), one value per leading index."""
    return F.cosine_similarity(a, b, dim=-1)
