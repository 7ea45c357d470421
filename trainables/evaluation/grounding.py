"""Weakly supervised grounding metrics: proposal scoring from a heat map, IoU, accuracy per split.

Follows ``salesforce/ALBEF:dataset/utils.py:grounding_eval`` and ``computeIoU``:

* the GradCAM map is upsampled bicubically to the original image (height, width);
* each proposal ``[x, y, w, h]`` (original pixels, COCO order) scores
  ``map[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5``;
* the best-scoring proposal is the prediction, a hit when its IoU with the ground
  truth is >= 0.5; accuracy = hits / referring expressions, per split (val, testA, testB).

IoU uses ALBEF's inclusive pixel arithmetic (``x2 = x + w - 1``; the intersection
counts only when ``x1 < x2`` and ``y1 < y2`` strictly) with the union from ``w * h``.
One deviation: ALBEF starts from ``max_score = 0`` and keeps the previous item's box
when no proposal scores above 0 (a stale variable); here the arg-max is taken over
all proposals (first on ties), so every item has a prediction.

Example:
    >>> heat = torch.zeros(10, 10); heat[6:9, 6:9] = 1.0
    >>> best_proposal(heat, [(0, 0, 4, 4), (6, 6, 3, 3)])
    1
    >>> box_iou((0, 0, 4, 4), (2, 0, 4, 4))
    0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainables.evaluation.gradcam import upsample_map

Box = Sequence[float]  # [x, y, w, h], original-image pixels (COCO order)
HIT_IOU = 0.5
SIZE_EXPONENT = 0.5  # ALBEF's alpha: score = sum / area ** alpha
GROUNDING_SPLITS = ("val", "testA", "testB")


def box_iou(box1: Box, box2: Box) -> float:
    """ALBEF's ``computeIoU`` of two ``[x, y, w, h]`` boxes (inclusive pixel arithmetic)."""
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def proposal_scores(heat: torch.Tensor, proposals: Sequence[Box], exponent: float = SIZE_EXPONENT) -> torch.Tensor:
    """Score of each proposal on a (H, W) map in original pixels: sum inside / area ** exponent."""
    if heat.dim() != 2:
        raise ValueError(f"heat map must be (H, W), got {tuple(heat.shape)}")
    if len(proposals) == 0:
        raise ValueError("no proposals to score")
    scores = []
    for x, y, w, h in (tuple(p[:4]) for p in proposals):
        if w <= 0 or h <= 0:
            raise ValueError(f"proposal {[x, y, w, h]} has no area")
        # int() truncation exactly as ALBEF slices the mask (a negative start would wrap in
        # Python slicing; boxes are inside the image in both RefCOCO+'s dets and ours).
        inside = heat[int(y):int(y + h), int(x):int(x + w)]
        scores.append(inside.sum() / (w * h) ** exponent)
    return torch.stack(scores)


def best_proposal(heat: torch.Tensor, proposals: Sequence[Box], exponent: float = SIZE_EXPONENT) -> int:
    """Index of the best-scoring proposal (first on ties)."""
    return int(torch.argmax(proposal_scores(heat, proposals, exponent)))


def choose_proposal(grid_map: torch.Tensor, image_size: tuple[int, int], proposals: Sequence[Box]) -> int:
    """Index of the predicted proposal for one item: upsample the (g, g) map to (height, width), pick the best."""
    return best_proposal(upsample_map(grid_map, image_size), proposals)


def ground(grid_map: torch.Tensor, image_size: tuple[int, int], proposals: Sequence[Box]) -> tuple[float, ...]:
    """Predicted box for one item (:func:`choose_proposal`'s)."""
    return tuple(float(v) for v in proposals[choose_proposal(grid_map, image_size, proposals)][:4])


def is_hit(gt_box: Box, predicted: Box, threshold: float = HIT_IOU) -> bool:
    """A grounding hit: IoU with the ground-truth box >= ``threshold`` (0.5 in ALBEF and the paper)."""
    return box_iou(gt_box, predicted) >= threshold


@dataclass(frozen=True)
class SplitAccuracy:
    """Hits over referring expressions of one split."""

    split: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def accuracy_per_split(hits: Sequence[bool], splits: Sequence[str]) -> dict[str, SplitAccuracy]:
    """Accuracy per split, in first-appearance order; splits without items are absent (ALBEF would divide by 0)."""
    if len(hits) != len(splits):
        raise ValueError(f"{len(hits)} hits but {len(splits)} split labels")
    counts: dict[str, list[int]] = {}
    for hit, split in zip(hits, splits):
        correct_total = counts.setdefault(split, [0, 0])
        correct_total[0] += int(bool(hit))
        correct_total[1] += 1
    return {split: SplitAccuracy(split, correct, total) for split, (correct, total) in counts.items()}
