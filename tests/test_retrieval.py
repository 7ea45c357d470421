"""Retrieval recall with several captions per image, against hand-computed rankings."""

from __future__ import annotations

import pytest
import torch

from trainables.evaluation.retrieval import recall_at_k
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
