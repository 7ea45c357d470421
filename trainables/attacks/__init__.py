"""Evaluation attacks on image-text retrieval, one per file, in a plain dict.

Every attack has the signature ``attack(model, images, captions, eps, generator) ->
AttackOutput``: images (B, 3, H, W) in [0, 1], ``captions[b]`` the captions of
image b; it returns adversarial images (and, for multimodal attacks, adversarial
captions and the word source they came from in ``text_source``). Invariants, tested
for every entry: ``||x_adv - x||_inf <= eps``, pixels in [0, 1], model weights and
train/eval mode unchanged, the same output for the same generator seed.
"""

from __future__ import annotations

from typing import Callable


from trainables.attacks.apgd import apgd_ce_attack, apgd_retrieval_attack
from trainables.attacks.base import AttackOutput
from trainables.attacks.co_attack import co_attack
from trainables.attacks.pgd_retrieval import pgd_retrieval_attack
from trainables.attacks.sga import sga_attack
from trainables.attacks.vlp_attack import vlp_attack
from trainables.errors import UserError

AttackFn = Callable[..., AttackOutput]

ATTACKS: dict[str, AttackFn] = {
    "pgd": pgd_retrieval_attack,  # image only, retrieval loss, 10 steps of 1/255
    "apgd": apgd_retrieval_attack,  # image only, retrieval loss, 100 steps (Croce & Hein 2020)
    "apgd-ce": apgd_ce_attack,  # APGD with CE over the batch's caption centroids
    "co-attack": co_attack,  # text then image (Zhang et al. 2022)
    "sga": sga_attack,  # text, image, text (Lu et al. 2023)
    "vlp-attack": vlp_attack,  # contrastive text + image (Wang et al. 2025, our reading)
}

# Attacks that also perturb the captions: they accept ``candidates=`` (a word source,
# see trainables.attacks.text_candidates) and report ``text_source``.
TEXT_ATTACKS: frozenset[str] = frozenset({"co-attack", "sga", "vlp-attack"})


def get_attack(name: str) -> AttackFn:
    """The attack called ``name``; unknown names raise with the list of valid ones."""
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}: use one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


__all__ = ["ATTACKS", "TEXT_ATTACKS", "AttackFn", "AttackOutput", "get_attack"]
