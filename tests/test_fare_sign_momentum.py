"""FARE's inner PGD with RobustVLM's 0.9 momentum on the signs, a named option (issue 14, defect 8).

The oracle is RobustVLM's ``train/pgd_train.py`` loop as REFERENCE-NOTES (FARE) describes
it, written out here: ``g = sign(grad)``, ``v = sign(0.9 v + g)``, ``delta += step * v``,
clamp to the eps-box and the pixel box, from the platform's uniform start.
"""

from __future__ import annotations

import pytest
import torch

from trainables.config import TrainConfig
from trainables.steps import fare_step

EPS, STEP, STEPS, CUT = 8 / 255, 1 / 255, 6, 0.5


def dead_below_cut(pixels):
    """A feature per pixel that is 0 below CUT: FARE's ascent pushes pixels there, where the gradient is exactly 0."""
    return torch.relu(pixels - CUT).flatten(1)


def oracle_fare_pgd(images, original, momentum):
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(images.shape, generator=generator)  # the platform's start: U(-eps, eps), in the pixel box
    delta = (torch.clamp(images + (2 * noise - 1) * EPS, 0, 1) - images)
    velocity = torch.zeros_like(images)
    for _ in range(STEPS):
        delta.requires_grad = True
        loss = ((dead_below_cut(images + delta) - original) ** 2).sum(-1).mean()
        gradient = torch.autograd.grad(loss, delta)[0].sign()
        velocity = (momentum * velocity + gradient).sign() if momentum else gradient
        delta = torch.clamp(delta.detach() + STEP * velocity, -EPS, EPS)
        delta = torch.clamp(images + delta, 0, 1) - images
    return images + delta


@pytest.mark.parametrize("sign_momentum", [True, False])
def test_fare_step_runs_robustvlms_sign_momentum_or_plain_sign_steps_as_configured(sign_momentum):
    images = torch.full((2, 3, 4, 4), CUT + 1.5 / 255)
    original = torch.full((2, 3 * 4 * 4), 10.0)  # far above every feature: the ascent lowers the features
    seen = []

    def train_encode(pixels):
        seen.append(pixels.detach().clone())
        return dead_below_cut(pixels)

    config = TrainConfig(defense="fare", eps=EPS, pgd_step_size=STEP, pgd_steps=STEPS, fare_sign_momentum=sign_momentum)
    fare_step(dead_below_cut, train_encode, images, None, original, config, torch.Generator().manual_seed(0))
    with_momentum, plain = oracle_fare_pgd(images, original, 0.9), oracle_fare_pgd(images, original, 0.0)
    # The dead region makes the two readings differ: momentum keeps moving where the gradient became 0.
    assert (with_momentum - plain).abs().max() > 0.5 / 255
    expected = with_momentum if sign_momentum else plain
    assert torch.allclose(seen[0], expected, atol=1e-6, rtol=0)
    assert (seen[0] - images).abs().max() <= EPS + 1e-7


def test_robustvlms_momentum_is_the_documented_default():
    assert TrainConfig().fare_sign_momentum is True
