"""Retrieval recall with several captions per image, against hand-computed rankings.

Ranks are pessimistic (a tie with the ground truth counts against the model) and
degenerate features (NaN, collapsed) are refused: a broken encoder never reads as robust.
"""

from __future__ import annotations

import pytest
import torch

from torch import nn

from trainables.errors import NonFiniteLossError
from trainables.evaluation.rerank import OUTSIDE_TOP_K, RerankedScores, recall_from_scores
from trainables.evaluation.retrieval import DegenerateFeaturesError, recall_at_k
from trainables.names import eps_fraction, eps_label, metric_name


def test_recall_by_hand():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # captions 0,1 belong to image 0; caption 2 to image 1. Caption 1 points at image 1 (a miss for IR).
    texts = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.0, 1.0]])
    metrics = recall_at_k(images, texts, torch.tensor([0, 0, 1]))
    # TR@1: image 0's best caption is caption 0 (its own) -> hit; image 1's best is caption 2 -> hit.
    assert metrics["tr1"] == pytest.approx(100.0)
    # IR@1: caption 0 -> image 0 hit, caption 1 -> image 1 miss, caption 2 -> image 1 hit.
    assert metrics["ir1"] == pytest.approx(200 / 3)
    assert metrics["ir5"] == pytest.approx(100.0)


def test_random_features_give_chance_level_recall():
    torch.manual_seed(0)
    metrics = recall_at_k(torch.randn(200, 16), torch.randn(1000, 16), torch.arange(200).repeat_interleave(5))
    assert metrics["ir1"] < 5 and metrics["tr1"] < 10


def test_metric_names_have_one_spelling():
    assert eps_label(4 / 255) == "eps4" and eps_label(3.5 / 255) == "eps3.5"
    assert eps_fraction(2 / 255) == "2/255"
    assert metric_name("pgd", 4 / 255, "tr1") == "pgd/eps4/tr1"
    assert metric_name("clean", None, "ir5") == "clean/ir5"


# ---- degenerate features never read as robust (issue 14, defect 1) ---------------------------


def _layout(num_images: int = 20, per_image: int = 5) -> torch.Tensor:
    return torch.arange(num_images).repeat_interleave(per_image)


def test_a_tie_with_the_ground_truth_counts_against_the_model():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # caption 0 (image 0's) and caption 1 (image 1's) are both at 45 degrees: each ties for both images.
    texts = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    metrics = recall_at_k(images, texts, torch.tensor([0, 1]))
    assert metrics["tr1"] == 0.0 and metrics["ir1"] == 0.0  # strictly-greater ranks said 100
    assert metrics["tr5"] == 100.0 and metrics["ir5"] == 100.0


@pytest.mark.parametrize("images", ["constant", "zero"])
def test_collapsed_or_zero_image_features_never_give_high_recall(images):
    torch.manual_seed(0)
    text_to_image = _layout()
    texts = torch.randn(len(text_to_image), 8)
    features = torch.ones(20, 8) if images == "constant" else torch.zeros(20, 8)
    metrics = recall_at_k(features, texts, text_to_image)
    # IR: every image ties, so no caption finds its image above the 19 others (chance would be 5% at K=1).
    assert metrics["ir1"] == metrics["ir10"] == 0.0
    # TR: the image ranks captions by text features alone (constant) or not at all (zero): chance or below.
    assert metrics["tr1"] <= 100 * 5 / 100 + 10 and metrics["tr1"] < 100


def test_all_zero_features_give_no_hit():
    text_to_image = _layout()
    metrics = recall_at_k(torch.zeros(20, 8), torch.zeros(100, 8), text_to_image)
    assert all(value == 0.0 for value in metrics.values())


@pytest.mark.parametrize("side", ["images", "texts"])
def test_nan_features_are_refused(side):
    text_to_image = _layout()
    images, texts = torch.randn(20, 8), torch.randn(100, 8)
    (images if side == "images" else texts)[3] = float("nan")
    with pytest.raises(DegenerateFeaturesError, match="NaN or infinite"):
        recall_at_k(images, texts, text_to_image)


def test_reranked_recall_ranks_ties_pessimistically_and_refuses_nan():
    text_to_image = torch.tensor([0, 1])
    tied = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert recall_from_scores(RerankedScores(i2t=tied, t2i=tied), text_to_image)["tr1"] == 0.0
    assert recall_from_scores(RerankedScores(i2t=tied, t2i=tied), text_to_image)["ir1"] == 0.0
    nan = torch.full((2, 2), float("nan"))
    with pytest.raises(DegenerateFeaturesError):
        recall_from_scores(RerankedScores(i2t=nan, t2i=tied), text_to_image)
    outside = torch.tensor([[OUTSIDE_TOP_K, 0.3], [0.2, 0.9]])  # image 0's caption never re-scored: a miss
    assert recall_from_scores(RerankedScores(i2t=outside, t2i=outside), text_to_image)["tr10"] == 50.0


class _Constant(nn.Module):
    """A collapsed vision encoder: every image maps to the same embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, pixels):
        return self.weight.expand(pixels.shape[0], -1) + 0 * pixels.mean()


class _NaN(_Constant):
    def forward(self, pixels):
        return super().forward(pixels) * float("nan")


@pytest.mark.parametrize("encoder, message", [(_Constant, "collapsed"), (_NaN, "NaN or infinite")])
def test_a_training_evaluation_of_a_degenerate_encoder_fails_the_trial_with_a_reason(encoder, message, random_tiny_clip,
                                                                                    synthetic_test_set):
    from trainables.config import TrainConfig
    from trainables.train import evaluate_model

    model = random_tiny_clip
    dim = model.encode_text(["a"]).shape[-1]
    model.vision = encoder(dim)
    config = TrainConfig(eval_attacks=(), eval_data="synthetic:test,n=8")
    # A NonFiniteLossError is what the Ray worker turns into a failed trial with this message as its reason.
    with pytest.raises(NonFiniteLossError, match=message):
        evaluate_model(model, torch.utils.data.Subset(synthetic_test_set, range(8)), config)
