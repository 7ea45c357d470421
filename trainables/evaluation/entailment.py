"""Visual-entailment accuracy with per-class counts (ALBEF's ``VE.py:evaluate``).

ALBEF predicts ``argmax`` of the 3-way head and averages per-batch accuracy weighted
by batch size, i.e. correct / total over the file; labels are ALBEF's
contradiction = 0, neutral = 1, entailment = 2 (``trainables.data.entailment.LABELS``).

Example:
    >>> score = entailment_accuracy(torch.tensor([[0.1, 0.2, 3.0], [2.0, 0.0, 0.0]]), [2, 1])
    >>> score.accuracy, score.per_class["neutral"]
    (0.5, ClassCount(total=1, correct=0, predicted=0))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainables.data.entailment import LABEL_NAMES


@dataclass(frozen=True)
class ClassCount:
    """One class: how many pairs carry it, how many of those were right, how often it was predicted."""

    total: int
    correct: int
    predicted: int


@dataclass(frozen=True)
class EntailmentScore:
    """Accuracy over all scored pairs and the counts behind it, per class name."""

    correct: int
    total: int
    per_class: dict[str, ClassCount]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def entailment_accuracy(predictions: torch.Tensor | Sequence[int], labels: torch.Tensor | Sequence[int]) -> EntailmentScore:
    """Score predicted classes against labels.

    Args:
        predictions: (N, 3) logits (arg-max taken) or (N,) predicted class indices.
        labels: (N,) class indices in {0, 1, 2}.
    """
    pred = torch.as_tensor(predictions)
    if pred.dim() == 2:
        if pred.shape[1] != len(LABEL_NAMES):
            raise ValueError(f"entailment logits must have {len(LABEL_NAMES)} columns, got {tuple(pred.shape)}")
        pred = pred.argmax(dim=1)
    gold = torch.as_tensor(labels).long()
    pred = pred.long()
    if pred.shape != gold.shape or pred.dim() != 1:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(gold.shape)} must both be (N,)")
    if gold.numel() == 0:
        raise ValueError("no entailment pairs to score")
    for name, values in (("labels", gold), ("predictions", pred)):
        if values.min() < 0 or values.max() >= len(LABEL_NAMES):
            raise ValueError(f"{name} must be class indices 0..{len(LABEL_NAMES) - 1} ({', '.join(LABEL_NAMES)})")
    right = pred == gold
    per_class = {
        name: ClassCount(
            total=int((gold == index).sum()),
            correct=int((right & (gold == index)).sum()),
            predicted=int((pred == index).sum()),
        )
        for index, name in enumerate(LABEL_NAMES)
    }
    return EntailmentScore(correct=int(right.sum()), total=int(gold.numel()), per_class=per_class)
