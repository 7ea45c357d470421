"""PGD (Madry et al. 2018): L-inf projected gradient ascent in pixel space.

Used both inside training (each defense passes its own inner loss) and for
evaluation (the retrieval loss). Paper defaults: 10 steps, step 1/255 (the
paper's "1.0" on the 0-255 scale), eps 2/255 or 4/255, random start in the ball.

Example::

    objective = lambda x: 1 - cosine(model.encode_image(x), caption_features)   # (B,)
    adversarial = pgd(objective, images, PGDSettings(eps=4/255), generator)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from trainables.attacks.projection import project_linf, random_start


@dataclass(frozen=True)
class PGDSettings:
    """Fields: eps and step_size in [0, 1] pixel units; steps; random_start in the eps-ball.

    ``sign_momentum``: 0 = plain sign steps; mu > 0 = RobustVLM's (FARE's code) velocity
    ``v = sign(mu * v + sign(g))``, the step direction. For 0 < mu < 1 that is ``sign(g)``
    wherever g != 0 (|mu * v| < 1), and keeps the previous direction where g == 0.
    """

    eps: float = 4 / 255
    steps: int = 10
    step_size: float = 1 / 255
    random_start: bool = True
    sign_momentum: float = 0.0


def pgd(
    objective: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: PGDSettings,
    generator: torch.Generator,
    keep_iterates: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Maximise ``objective`` over the eps-ball around ``images`` with signed gradient steps.

    Args:
        objective: maps images (B, C, H, W) to per-sample losses (B,) to *maximise*.
        images: (B, C, H, W) clean images in [0, 1].
        settings: eps, steps, step size, random start.
        generator: seeds the random start (the attack is deterministic given it).
        keep_iterates: also return the last ``keep_iterates`` iterates (B, k, C, H, W),
            used by MAVA's ``neighbours: last_iterates``.
    Returns:
        adversarial images (B, C, H, W) with ``||x_adv - x||_inf <= eps`` and values in [0, 1]
        (the last iterate), plus the kept iterates when ``keep_iterates > 0``.

    Only the input gradient is computed (``torch.autograd.grad``): model parameter
    ``.grad`` fields are never touched.
    """
    images = images.detach()
    adversarial = random_start(images, settings.eps, generator) if settings.random_start else images.clone()
    iterates: list[torch.Tensor] = []
    velocity = torch.zeros_like(images)
    for _ in range(settings.steps):
        adversarial.requires_grad_(True)
        loss = objective(adversarial).sum()
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            direction = gradient.sign()
            if settings.sign_momentum:
                velocity = direction = (settings.sign_momentum * velocity + direction).sign()
            adversarial = project_linf(adversarial + settings.step_size * direction, images, settings.eps)
        if keep_iterates:
            iterates.append(adversarial)
    adversarial = adversarial.detach()
    if keep_iterates:
        kept = iterates[-keep_iterates:] if iterates else [adversarial]
        while len(kept) < keep_iterates:  # fewer steps than iterates asked: repeat the first kept one
            kept = [kept[0]] + kept
        return adversarial, torch.stack(kept, dim=1)
    return adversarial
