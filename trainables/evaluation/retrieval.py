"""Image-text retrieval recall with several captions per image (TR@K, IR@K), as in the SGA/ALBEF evaluations.

TR@K: an image counts when its best-ranked ground-truth caption is in the top K of all
captions. IR@K: a caption counts when its image is in the top K of all images.
Similarities are cosines of the model's embeddings. Values are percentages.

Ranks are *pessimistic*: a wrong item scored equal to the ground truth ranks above it
(ties count against the model). Counting only strictly greater scores made a collapsed
encoder (every image the same embedding, or all-zero features) score TR@1 = IR@1 = 100,
and those per-epoch numbers are what a sweep optimises. Non-finite scores are refused
(NaN compares false, so a NaN model would otherwise rank first everywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.errors import NonFiniteLossError
from trainables.names import RECALL_KEYS

KS = (1, 5, 10)
# Normalised image embeddings all within this distance of their mean: the encoder has collapsed.
COLLAPSE_TOLERANCE = 1e-4


class DegenerateFeaturesError(NonFiniteLossError):
    """Evaluation features are non-finite or collapsed, so no recall can be trusted.

    A subclass of :class:`NonFiniteLossError` because it is just as deterministic: the Ray
    worker reports it as a failed trial with this message (the ``mava.failure`` tag in
    MLflow) instead of retrying it or reporting a recall.
    """


def check_finite(features: torch.Tensor, what: str) -> None:
    """Refuse NaN/inf ``features`` with a message naming ``what`` they are and what to check."""
    bad = ~torch.isfinite(features)
    if bool(bad.any()):
        rows = int(bad.flatten(1).any(dim=1).sum()) if features.dim() > 1 else int(bad.sum())
        raise DegenerateFeaturesError(
            f"{what}: {rows} of {features.shape[0]} rows are NaN or infinite, so no recall can be computed "
            "(NaN compares false and would rank every ground truth first); the model diverged, or an attack or "
            "bf16 overflow produced NaN: lower lr or eps, evaluate in fp32, or check the weights")


def check_not_collapsed(image_features: torch.Tensor, what: str) -> None:
    """Refuse image features that are all (nearly) the same direction, or all zero: a collapsed encoder."""
    normalized = F.normalize(image_features.float(), dim=-1)
    if normalized.shape[0] > 1 and float((normalized - normalized.mean(dim=0)).norm(dim=-1).max()) < COLLAPSE_TOLERANCE:
        raise DegenerateFeaturesError(
            f"{what}: all {normalized.shape[0]} images have the same embedding direction (or are all zero): the vision "
            "encoder has collapsed and its recall would only measure tie-breaking; lower lr, raise the weight of the "
            "term anchoring it to F_org (FARE's loss, MAVA's b and c), or check the weights")


def pessimistic_ranks(scores: torch.Tensor, ground_truth_score: torch.Tensor, is_ground_truth: torch.Tensor) -> torch.Tensor:
    """Per query, how many *wrong* items score at least the ground truth's score (ties count against the model).

    Args:
        scores: (Q, C) scores of every candidate for each query.
        ground_truth_score: (Q,) the score of the query's (best) ground truth.
        is_ground_truth: (Q, C) True where a candidate is a ground truth of the query.
    Returns:
        (Q,) ranks; the query is a hit at K when its rank is below K.
    """
    return ((scores >= ground_truth_score.unsqueeze(1)) & ~is_ground_truth).sum(dim=1)


def retrieval_ranks(similarity: torch.Tensor, text_to_image: torch.Tensor,
                    i2t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pessimistic ranks from (I, T) scores: (image ranks (I,), caption ranks (T,), and their ground-truth scores).

    Args:
        similarity: (I, T) scores ranking images per caption (IR@K), and captions per image
            (TR@K) unless ``i2t`` is given.
        text_to_image: (T,) index of each caption's image.
        i2t: (I, T) scores ranking captions per image, when they differ (ITM re-ranking).
    Returns:
        each image's rank of its best-ranked ground-truth caption (TR), each caption's rank of
        its image (IR), then the ground-truth scores those ranks were taken at.
    """
    t2i = similarity
    i2t = similarity if i2t is None else i2t
    check_finite(t2i, "retrieval scores")
    check_finite(i2t, "retrieval scores")
    num_images, num_texts = t2i.shape
    is_ground_truth = text_to_image.unsqueeze(0) == torch.arange(num_images).unsqueeze(1)  # (I, T)
    best_gt_score = torch.where(is_ground_truth, i2t, torch.full_like(i2t, float("-inf"))).max(dim=1).values
    best_gt_rank = pessimistic_ranks(i2t, best_gt_score, is_ground_truth)  # (I,)
    gt_image_score = t2i[text_to_image, torch.arange(num_texts)]  # (T,)
    image_rank = pessimistic_ranks(t2i.T, gt_image_score, is_ground_truth.T)  # (T,)
    return best_gt_rank, image_rank, best_gt_score, gt_image_score


def recall_from_ranks(image_ranks: torch.Tensor, caption_ranks: torch.Tensor) -> dict[str, float]:
    """TR@1/5/10 from the images' ranks and IR@1/5/10 from the captions' ranks, in percent (hit: rank < K)."""
    metrics = {}
    for k in KS:
        metrics[f"tr{k}"] = 100.0 * (image_ranks < k).float().mean().item()
        metrics[f"ir{k}"] = 100.0 * (caption_ranks < k).float().mean().item()
    return {key: metrics[key] for key in RECALL_KEYS}


def ranks_at_k(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pessimistic ranks from cosine similarities: each image's (I,) and each caption's (T,); NaN/inf refused.

    Args:
        image_features: (I, D); text_features: (T, D); text_to_image: (T,) index of each caption's image.
    """
    check_finite(image_features, "image features")
    check_finite(text_features, "text features")
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T  # (I, T)
    image_ranks, caption_ranks, _, _ = retrieval_ranks(similarity, text_to_image)
    return image_ranks, caption_ranks


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """TR@1/5/10 and IR@1/5/10 in percent from cosine similarities (pessimistic ranks; NaN/inf refused).

    Args:
        image_features: (I, D); text_features: (T, D); text_to_image: (T,) index of each caption's image.
    """
    return recall_from_ranks(*ranks_at_k(image_features, text_features, text_to_image))
