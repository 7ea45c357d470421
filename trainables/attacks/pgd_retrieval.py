"""PGD against retrieval: push each image away from its own captions (clean texts).

Objective: per image ``1 - mean cosine(F(x'), F(t_i))`` over its captions, maximised
with :func:`trainables.attacks.pgd.pgd` (10 steps, step 1/255, random start).
"""

from __future__ import annotations

import torch

from trainables.attacks.base import AttackOutput, caption_centroids, frozen_eval, retrieval_loss
from trainables.attacks.pgd import PGDSettings, pgd


def pgd_retrieval_attack(model, images: torch.Tensor, captions: list[tuple[str, ...]], eps: float, generator: torch.Generator,
                         steps: int = 10, step_size: float = 1 / 255) -> AttackOutput:
    """Image-only PGD on the retrieval loss. See the module docstring."""
    with frozen_eval(model):
        centroids = caption_centroids(model, captions)
        adversarial = pgd(lambda x: retrieval_loss(model.encode_image(x), centroids), images,
                          PGDSettings(eps=eps, steps=steps, step_size=step_size), generator)
    return AttackOutput(images=adversarial)
