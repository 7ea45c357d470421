"""Attacks and evaluation run in eval mode (issue 14, defect 7): BatchNorm statistics stay as they were.

The presets' ViTs have no BatchNorm or dropout, so train mode during an attack went
unnoticed; ``open_clip:RN50``/``RN101`` (SGA's CLIP-CNN target) have BatchNorm. A tiny
convolutional encoder with BatchNorm makes the difference visible: in train mode every
forward updates ``running_mean`` and ``num_batches_tracked``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from trainables.config import Defense, TrainConfig
from trainables.evaluation.robustness import EvalSettings, evaluate_retrieval
from trainables.steps import STEPS, make_encoders


def _batchnorm_encoder(dim: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, dim))


@pytest.fixture()
def batchnorm_model(random_tiny_clip):
    model = random_tiny_clip
    model.vision = _batchnorm_encoder(model.encode_text(["a"]).shape[-1])
    model.vision_original = copy.deepcopy(model.vision).requires_grad_(False).eval()
    return model


def _statistics(model) -> tuple[torch.Tensor, torch.Tensor, int]:
    norm = model.vision[1]
    return norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked)


@pytest.mark.parametrize("defense", list(Defense))
def test_the_training_attack_runs_in_eval_mode_and_only_the_outer_forward_updates_batchnorm(defense, batchnorm_model,
                                                                                            synthetic_test_set):
    model = batchnorm_model
    config = TrainConfig(defense=defense, pgd_steps=3, M=2)
    images = torch.stack([synthetic_test_set[i].image for i in range(4)])
    captions = [synthetic_test_set[i].captions[:2] for i in range(4)]
    with torch.no_grad():
        caption_features = model.encode_text([c for group in captions for c in group]).view(4, 2, -1)
    attack, train = make_encoders(model.vision, model.vision, model.normalize, config)
    model.vision.train()
    before = _statistics(model)
    STEPS[defense](attack, train, images, caption_features, model.encode_image_original(images), config, torch.Generator().manual_seed(0))
    # One train-mode forward (the outer step's, batched over every view); the 3 PGD steps add none.
    assert _statistics(model)[2] == before[2] + 1
    assert model.vision.training and all(module.training for module in model.vision.modules())


def test_evaluation_and_its_attacks_leave_batchnorm_statistics_and_the_mode_unchanged(batchnorm_model, synthetic_test_set):
    model = batchnorm_model
    model.vision.train()  # as the training loop leaves it between epochs
    before = _statistics(model)
    evaluate_retrieval(model, Subset(synthetic_test_set, range(8)), EvalSettings(attacks=("pgd",), eps=(4 / 255,), batch_size=8))
    after = _statistics(model)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1]) and after[2] == before[2]
    assert model.vision.training  # restored for the next epoch
