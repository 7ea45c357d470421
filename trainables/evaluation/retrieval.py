"""Image-text retrieval recall with several captions per image (TR@K, IR@K), as in the SGA/ALBEF evaluations.

TR@K: an image counts when its best-ranked ground-truth caption is in the top K of all
captions. IR@K: a caption counts when its image is in the top K of all images.
Similarities are cosines of the model's embeddings. Values are percentages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.names import RECALL_KEYS

KS = (1, 5, 10)


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """TR@1/5/10 and IR@1/5/10 in percent.

    Args:
        image_features: (I, D); text_features: (T, D); text_to_image: (T,) index of each caption's image.
    """
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T  # (I, T)
    num_images = similarity.shape[0]
    is_ground_truth = text_to_image.unsqueeze(0) == torch.arange(num_images).unsqueeze(1)  # (I, T)

    # An image's rank = number of captions scored strictly above its best ground-truth caption.
    best_gt_score = torch.where(is_ground_truth, similarity, torch.full_like(similarity, float("-inf"))).max(dim=1).values
    best_gt_rank = (similarity > best_gt_score.unsqueeze(1)).sum(dim=1)  # (I,)
    gt_image_score = similarity[text_to_image, torch.arange(similarity.shape[1])]  # (T,)
    image_rank = (similarity > gt_image_score.unsqueeze(0)).sum(dim=0)  # (T,)
    metrics = {}
    for k in KS:
        metrics[f"tr{k}"] = 100.0 * (best_gt_rank < k).float().mean().item()
        metrics[f"ir{k}"] = 100.0 * (image_rank < k).float().mean().item()
    return {key: metrics[key] for key in RECALL_KEYS}

