"""One adversarial fine-tuning step per defense: attack (inner max) -> forward -> outer loss.

Each step takes precomputed frozen features (caption features of the batch's
images, ``F_org`` of the clean images): both come from frozen encoders, so the
loop computes them once per dataset instead of once per step (issue 7). The step
returns the loss terms; the caller does backward and the optimiser step.
"""

from __future__ import annotations

from typing import Callable

import torch

from trainables.attacks.pgd import PGDSettings, pgd
from trainables.config import Defense, EmbeddingSpace, NeighbourMode, TrainConfig
from trainables.defenses.fare import fare_loss, fare_outer_loss
from trainables.defenses.mava import mava_inner_loss, mava_outer_loss, sample_neighbours
from trainables.defenses.tecoa import class_text_features, tecoa_loss, tecoa_outer_loss

# Maps [0, 1] pixels (B, C, H, W) to features (B, D) through the *trainable* encoder.
Encoder = Callable[[torch.Tensor], torch.Tensor]


def pgd_settings(config: TrainConfig) -> PGDSettings:
    return PGDSettings(eps=config.eps, steps=config.pgd_steps, step_size=config.pgd_step_size, random_start=True)


def mava_step(attack_encode: Encoder, train_encode: Encoder, images: torch.Tensor, caption_features: torch.Tensor,
              original_features: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """MAVA (Eqs. 5-7): PGD on L_inner, then a*L_CMS + b*L_VSSE + c*L_SCA on N neighbours and the clean image.

    Args:
        attack_encode: encoder used by the inner PGD (no DDP wrapper: no gradient sync).
        train_encode: encoder whose parameters receive the outer gradient (DDP-wrapped under Ray Train).
        images: (B, C, H, W) clean; caption_features: (B, M, D); original_features: (B, D) = F_org(v).
    """
    normalized = config.embedding_space is EmbeddingSpace.NORMALIZED

    def inner(x: torch.Tensor) -> torch.Tensor:
        return mava_inner_loss(attack_encode(x), original_features, caption_features, config.cms_form, normalized, config.inner_text_distance)

    if config.neighbours is NeighbourMode.TRAJECTORY:
        _, neighbours = pgd(inner, images, pgd_settings(config), generator, keep_iterates=config.N)
    else:
        adversarial = pgd(inner, images, pgd_settings(config), generator)
        neighbours = sample_neighbours(adversarial, config.N, config.beta * config.eps, generator)
    batch, count = neighbours.shape[:2]
    # One batched forward over the N neighbours and the clean image (N+1 views per image).
    views = torch.cat([neighbours.flatten(0, 1), images])
    features = train_encode(views)
    neighbour_features = features[: batch * count].view(batch, count, -1)
    clean_features = features[batch * count:]
    return mava_outer_loss(neighbour_features, clean_features, original_features, caption_features,
                           config.a, config.b, config.c, config.cms_form, normalized, config.sca_half)


def fare_step(attack_encode: Encoder, train_encode: Encoder, images: torch.Tensor, caption_features: torch.Tensor,
              original_features: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """FARE: PGD maximising ``||F(x') - F_org(x)||^2``, then minimise it at x'. Captions are unused."""
    adversarial = pgd(lambda x: fare_loss(attack_encode(x), original_features), images, pgd_settings(config), generator)
    return fare_outer_loss(train_encode(adversarial), original_features)


def tecoa_step(attack_encode: Encoder, train_encode: Encoder, images: torch.Tensor, caption_features: torch.Tensor,
               original_features: torch.Tensor, config: TrainConfig, generator: torch.Generator, logit_scale: float = 100.0) -> dict[str, torch.Tensor]:
    """TeCoA: PGD maximising the image->class cross-entropy, then minimise it at x'."""
    classes = class_text_features(caption_features)
    adversarial = pgd(lambda x: tecoa_loss(attack_encode(x), classes, logit_scale), images, pgd_settings(config), generator)
    return tecoa_outer_loss(train_encode(adversarial), classes, logit_scale)


STEPS = {Defense.MAVA: mava_step, Defense.FARE: fare_step, Defense.TECOA: tecoa_step}
