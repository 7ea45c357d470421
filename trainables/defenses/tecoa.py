"""TeCoA (Mao et al., ICLR 2023): text-guided contrastive adversarial fine-tuning.

The loss is the cross-entropy of ``scale * norm(F(v')) @ norm(T)^T`` against the
right "class". For image-caption data the batch's images are the classes, each
represented by the normalised mean of its M caption features (a deterministic
choice; the reference code uses one class prompt per class). The inner PGD
maximises this cross-entropy and the outer step minimises it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_text_features(caption_features: torch.Tensor) -> torch.Tensor:
    """(B, M, D) caption features -> (B, D) normalised class embeddings (mean of the normalised captions)."""
    return F.normalize(F.normalize(caption_features, dim=-1).mean(dim=1), dim=-1)


def tecoa_loss(adversarial_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per-image cross-entropy: image b's class is b. (B, D), (B, D) -> (B,)."""
    logits = logit_scale * F.normalize(adversarial_features, dim=-1) @ class_features.T
    labels = torch.arange(adversarial_features.shape[0], device=adversarial_features.device)
    return F.cross_entropy(logits, labels, reduction="none")


def tecoa_outer_loss(adversarial_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> dict[str, torch.Tensor]:
    """Batch mean of the TeCoA loss, named for logging."""
    loss = tecoa_loss(adversarial_features, class_features, logit_scale).mean()
    return {"loss": loss, "l_tecoa": loss}
