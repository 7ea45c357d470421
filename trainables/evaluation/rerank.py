"""BLIP-style retrieval scoring: the contrastive top-k_test re-scored by the ITM head.

As in BLIP's ``train_retrieval.py`` evaluation (REFERENCE-NOTES: ALBEF/TCL/BLIP score
retrieval this way, with k_test = 128 on Flickr30k and 256 on COCO):

* for each image, its k_test captions most similar by ITC cosine get the score
  ``ITC cosine + ITM match logit``; every other caption gets ``OUTSIDE_TOP_K``;
* independently, for each caption, its k_test most similar images get the same sum;
  every other image gets ``OUTSIDE_TOP_K``.

The sum is BLIP's choice (rule ``"itc+itm"``); ALBEF's and TCL's evaluations use the ITM
score alone (rule ``"itm"``). Each model declares its rule as ``model.itm_scoring``. The two
directions re-score different candidate sets, so there are two matrices: ``i2t``
ranks captions per image (TR@K), ``t2i`` ranks images per caption (IR@K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainables.evaluation.retrieval import recall_from_ranks, retrieval_ranks

# BLIP and ALBEF fill non-candidates with -100: far below any cosine (>= -1) plus ITM logit.
OUTSIDE_TOP_K = -100.0
ITM_RULES = ("itc+itm", "itm")


def scoring_label(model, k_test: int) -> str:
    """How retrieval of ``model`` is scored, recorded with every result: ``itc`` or e.g. ``itc+itm@128``."""
    rule = model.itm_scoring
    return "itc" if rule is None else f"{rule}@{k_test}"


@dataclass(frozen=True)
class RerankedScores:
    """Re-ranked scores, both laid out (images, captions).

    Attributes:
        i2t: row i scores every caption for image i (only its top-k_test are re-scored).
        t2i: column t scores every image for caption t (only its top-k_test are re-scored).
    """

    i2t: torch.Tensor
    t2i: torch.Tensor


def itc_similarity(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(I, T) cosine similarities of ITC features (what BLIP ranks its candidates by)."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T


@torch.no_grad()
def rerank_similarity(model, images: torch.Tensor, captions_flat: list[str], similarity: torch.Tensor, k_test: int,
                      batch_size: int = 32, rule: str = "itc+itm") -> RerankedScores:
    """Re-score each image's and each caption's top-k_test candidates with ``model``'s ITM head.

    Args:
        model: a model with ``image_tokens(pixels)`` and ``itm_pair_logits(tokens, texts)``
            (``hf-blip-itr``); ITM reads the *trainable* vision encoder.
        images: (I, 3, H, W) in [0, 1] (clean or adversarial: what was scored).
        captions_flat: the T captions, column order of ``similarity``.
        similarity: (I, T) ITC similarities, e.g. from :func:`itc_similarity`.
        k_test: candidates re-scored per image and per caption (capped at T and I).
        rule: ``"itc+itm"`` (BLIP: ITC cosine + ITM logit) or ``"itm"`` (ALBEF/TCL: ITM logit alone).
    """
    if rule not in ITM_RULES:
        raise ValueError(f"unknown ITM scoring rule {rule!r}: use one of {', '.join(ITM_RULES)}")
    with_itc = rule == "itc+itm"
    num_images, num_texts = similarity.shape
    if images.shape[0] != num_images or len(captions_flat) != num_texts:
        raise ValueError(f"similarity is {tuple(similarity.shape)} but there are {images.shape[0]} images and {len(captions_flat)} captions")
    if k_test < 1:
        raise ValueError(f"k_test must be at least 1, got {k_test}")
    device = model.pixel_mean.device
    # Encode every image once: each is a candidate for up to T captions (BLIP caches these too).
    tokens = torch.cat([model.image_tokens(images[i:i + batch_size].to(device)) for i in range(0, num_images, batch_size)])
    similarity = similarity.float().cpu()

    i2t = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    k = min(k_test, num_texts)
    for image in range(num_images):
        top_similarity, top = similarity[image].topk(k)
        logits = model.itm_pair_logits(tokens[image:image + 1].expand(k, -1, -1), [captions_flat[t] for t in top.tolist()])
        i2t[image, top] = logits.float().cpu() + (top_similarity if with_itc else 0.0)

    t2i = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    k = min(k_test, num_images)
    for text in range(num_texts):
        top_similarity, top = similarity[:, text].topk(k)
        logits = model.itm_pair_logits(tokens[top.to(device)], [captions_flat[text]] * k)
        t2i[top, text] = logits.float().cpu() + (top_similarity if with_itc else 0.0)
    return RerankedScores(i2t=i2t, t2i=t2i)


def recall_from_scores(scores: RerankedScores, text_to_image: torch.Tensor) -> dict[str, float]:
    """TR@1/5/10 and IR@1/5/10 in percent from re-ranked scores (same definitions as ``recall_at_k``; ranks: :func:`ranks_from_scores`)."""
    return recall_from_ranks(*ranks_from_scores(scores, text_to_image))


def ranks_from_scores(scores: RerankedScores, text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's (I,) and each caption's (T,) rank under re-ranked scores.

    Ranks are pessimistic (a wrong item tied with the ground truth ranks above it) and
    non-finite scores are refused, as in ``recall_at_k``. A ground truth left outside the
    top-k_test counts as a miss at every K, also for K > k_test (its true rank is unknown,
    only known to be >= k_test).
    """
    image_ranks, caption_ranks, best_gt_score, gt_image_score = retrieval_ranks(scores.t2i, text_to_image, i2t=scores.i2t)
    never = torch.iinfo(torch.long).max  # a rank no K reaches
    image_ranks[best_gt_score <= OUTSIDE_TOP_K] = never  # never re-scored: a miss
    caption_ranks[gt_image_score <= OUTSIDE_TOP_K] = never
    return image_ranks, caption_ranks
