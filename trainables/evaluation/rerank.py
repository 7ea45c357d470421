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


def candidate_pairs(similarity: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The pairs to re-score: each image's ITC top-k_test captions, then each caption's top-k_test images.

    Returns (images, texts, similarities, direction_split): flat (P,) index and ITC-score
    tensors, image->text pairs first (image-major, as ALBEF's per-image loop visits them),
    then text->image pairs; ``direction_split`` is the number of image->text pairs.
    """
    num_images, num_texts = similarity.shape
    k = min(k_test, num_texts)
    i2t_similarity, i2t_texts = similarity.topk(k, dim=1)  # (I, k): per row, as similarity[image].topk(k)
    i2t_images = torch.arange(num_images).repeat_interleave(k)
    k = min(k_test, num_images)
    t2i_similarity, t2i_images = similarity.topk(k, dim=0)  # (k, T): per column, as similarity[:, text].topk(k)
    t2i_texts = torch.arange(num_texts).repeat_interleave(k)
    return (torch.cat([i2t_images, t2i_images.T.reshape(-1)]), torch.cat([i2t_texts.reshape(-1), t2i_texts]),
            torch.cat([i2t_similarity.reshape(-1), t2i_similarity.T.reshape(-1)]), i2t_images.numel())


def _pair_logits(model, tokens: torch.Tensor, captions_flat: list[str], images: torch.Tensor, texts: torch.Tensor,
                 text_states: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """(P,) ITM logits of pairs (images[p], texts[p]) (indices), on the CPU."""
    device = tokens.device
    if text_states is None:
        return model.itm_pair_logits(tokens[images.to(device)], [captions_flat[t] for t in texts.tolist()]).float().cpu()
    distinct_images, image_index = torch.unique(images, return_inverse=True)  # pairs of one batch share few images
    return model.itm_cached_logits(tokens[distinct_images.to(device)], text_states, texts.to(device), image_index.to(device)).float().cpu()


@torch.no_grad()
def rerank_similarity(model, images: torch.Tensor, captions_flat: list[str], similarity: torch.Tensor, k_test: int,
                      batch_size: int = 32, rule: str = "itc+itm", pair_batch: int = 128) -> RerankedScores:
    """Re-score each image's and each caption's top-k_test candidates with ``model``'s ITM head.

    Batched across images: the candidate pairs of every image (and of every caption)
    are scored ``pair_batch`` at a time, not one image's k_test per forward pass as
    ALBEF's and BLIP's evaluation loops do, and a pair that is a candidate in both
    directions (an image's top caption whose top images include that image) is scored
    once: its ITM logit does not depend on the direction. ``benchmarks/rerank_cost.py``
    compares this with the per-image loop.

    Args:
        model: a model with ``image_tokens(pixels)`` and ``itm_pair_logits(tokens, texts)``
            (``hf-blip-itr``, ALBEF/TCL); ITM reads the *trainable* vision encoder.
        images: (I, 3, H, W) in [0, 1] (clean or adversarial: what was scored).
        captions_flat: the T captions, column order of ``similarity``.
        similarity: (I, T) ITC similarities, e.g. from :func:`itc_similarity`.
        k_test: candidates re-scored per image and per caption (capped at T and I).
        batch_size: images per vision forward pass.
        rule: ``"itc+itm"`` (BLIP: ITC cosine + ITM logit) or ``"itm"`` (ALBEF/TCL: ITM logit alone).
        pair_batch: image-text pairs per ITM call (bounds the gathered image tokens' memory).
    """
    if rule not in ITM_RULES:
        raise ValueError(f"unknown ITM scoring rule {rule!r}: use one of {', '.join(ITM_RULES)}")
    num_images, num_texts = similarity.shape
    if images.shape[0] != num_images or len(captions_flat) != num_texts:
        raise ValueError(f"similarity is {tuple(similarity.shape)} but there are {images.shape[0]} images and {len(captions_flat)} captions")
    if k_test < 1:
        raise ValueError(f"k_test must be at least 1, got {k_test}")
    device = model.pixel_mean.device
    # Encode every image once: each is a candidate for up to T captions (BLIP caches these too).
    tokens = torch.cat([model.image_tokens(images[i:i + batch_size].to(device)) for i in range(0, num_images, batch_size)])
    similarity = similarity.float().cpu()
    pair_images, pair_texts, pair_similarity, split = candidate_pairs(similarity, k_test)
    # ALBEF/TCL: the text-only layers once per caption, as ALBEF's evaluation does (BLIP's text encoder sees the image in every layer).
    text_states = model.itm_text_states(captions_flat) if hasattr(model, "itm_text_states") else None
    # Each distinct pair once, in (image, caption) order, so that a batch holds few distinct images.
    distinct, which = torch.unique(pair_images * num_texts + pair_texts, return_inverse=True)
    distinct_images, distinct_texts = distinct // num_texts, distinct % num_texts
    logits = torch.cat([_pair_logits(model, tokens, captions_flat, distinct_images[start:start + pair_batch],
                                     distinct_texts[start:start + pair_batch], text_states)
                        for start in range(0, distinct.numel(), pair_batch)])
    scores = logits[which] + (pair_similarity if rule == "itc+itm" else 0.0)
    i2t = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    i2t[pair_images[:split], pair_texts[:split]] = scores[:split]
    t2i = torch.full((num_images, num_texts), OUTSIDE_TOP_K)
    t2i[pair_images[split:], pair_texts[split:]] = scores[split:]
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
