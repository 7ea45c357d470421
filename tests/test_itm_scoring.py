"""ITM re-ranking is the evaluation of every model with an ITM head (issue 14, defect 2).

A tiny hand case where the ITM head changes the answer, ranked by hand, and an
evaluation of a model declaring ``itm_scoring`` whose rows must be the re-ranked ones
and say so (``scoring: itc+itm@K``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from trainables.evaluation.rerank import itc_similarity, recall_from_scores, rerank_similarity
from trainables.evaluation.retrieval import recall_at_k
from trainables.evaluation.robustness import EvalSettings, evaluate_retrieval_rows


class _HandItm:
    """Two images (pixel value = image id) and an ITM head given as a table of (image, caption) logits."""

    pixel_mean = torch.zeros(1, 3, 1, 1)
    logits = {(0, "a"): 3.0, (1, "b"): 5.0}

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels[:, :1, 0, :1]  # (B, 1, 1): the image id

    def itm_pair_logits(self, tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.logits.get((int(token.item()), text), 0.0) for token, text in zip(tokens, texts)])


IMAGES = torch.stack([torch.full((3, 2, 2), float(i)) for i in range(2)])
CAPTIONS = ["a", "b"]  # caption a is image 0's, caption b image 1's
TEXT_TO_IMAGE = torch.tensor([0, 1])
# ITC alone: image 1 prefers caption a (0.7 > 0.6) and caption b prefers image 0 (0.8 > 0.6).
ITC = torch.tensor([[0.9, 0.8], [0.7, 0.6]])


def test_itc_alone_misses_what_the_itm_head_fixes():
    assert recall_from_scores(rerank_similarity(_HandItm(), IMAGES, CAPTIONS, ITC, k_test=1), TEXT_TO_IMAGE)["tr1"] == 50.0
    scores = rerank_similarity(_HandItm(), IMAGES, CAPTIONS, ITC, k_test=2)
    # By hand, BLIP's rule (ITC + ITM): image 1 scores a 0.7 + 0, b 0.6 + 5 -> b first (hit); image 0: a 3.9, b 0.8 (hit).
    assert torch.allclose(scores.i2t, torch.tensor([[3.9, 0.8], [0.7, 5.6]]))
    # caption b scores image 0 0.8 + 0, image 1 0.6 + 5 -> image 1 first (hit); caption a: image 0 3.9, image 1 0.7 (hit).
    assert recall_from_scores(scores, TEXT_TO_IMAGE) == {"tr1": 100.0, "tr5": 100.0, "tr10": 100.0, "ir1": 100.0, "ir5": 100.0, "ir10": 100.0}
    # k_test = 1: caption b is outside image 1's ITC top-1, and image 1 outside caption b's: both misses.
    assert recall_from_scores(rerank_similarity(_HandItm(), IMAGES, CAPTIONS, ITC, k_test=1), TEXT_TO_IMAGE)["ir1"] == 50.0
    # ALBEF/TCL's rule: the ITM logit alone.
    assert rerank_similarity(_HandItm(), IMAGES, CAPTIONS, ITC, k_test=2, rule="itm").i2t.tolist() == [[3.0, 0.0], [0.0, 5.0]]


def test_a_model_with_an_itm_head_is_evaluated_by_re_ranking_and_the_row_says_how(random_tiny_clip, synthetic_test_set):
    model = random_tiny_clip
    # An ITM head that reorders by something ITC ignores: it makes the evaluation's answer differ from cosine.
    model.itm_scoring = "itc+itm"
    model.image_tokens = lambda pixels: model.encode_image(pixels).unsqueeze(1)
    model.itm_pair_logits = lambda tokens, texts: 10.0 * tokens[:, 0, 0] * torch.tensor([len(t) % 7 for t in texts])
    dataset = Subset(synthetic_test_set, range(8))
    rows = evaluate_retrieval_rows(model, dataset, EvalSettings(attacks=(), k_test=3))
    assert [row.scoring for row in rows] == ["itc+itm@3"] and rows[0].to_json()["scoring"] == "itc+itm@3"
    images = torch.stack([dataset[i].image for i in range(8)])
    captions = [caption for i in range(8) for caption in dataset[i].captions]
    text_to_image = torch.tensor([i for i in range(8) for _ in dataset[i].captions])
    with torch.no_grad():
        image_features, text_features = model.encode_image(images), model.encode_text(captions)
    expected = recall_from_scores(rerank_similarity(model, images, captions, itc_similarity(image_features, text_features), 3),
                                  text_to_image)
    assert rows[0].recalls == pytest.approx(expected)
    assert rows[0].recalls != pytest.approx(recall_at_k(image_features, text_features, text_to_image))


def test_a_model_without_an_itm_head_is_scored_by_cosine(random_tiny_clip, synthetic_test_set):
    rows = evaluate_retrieval_rows(random_tiny_clip, Subset(synthetic_test_set, range(8)), EvalSettings(attacks=()))
    assert rows[0].scoring == "itc"
