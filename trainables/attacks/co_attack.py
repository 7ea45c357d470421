"""Co-attack (Zhang et al., ACM MM 2022): text first, then the image guided by the adversarial text.

As in the authors' ``MultiModalAttacker.run_before_fusion`` (``adv=4``, unimodal embeddings):

1. text: BERT-Attack (:mod:`~trainables.attacks.text_attack`), 1 word, top-10
   candidates, maximising the change of the caption's own embedding,
   ``KL(softmax f(t) || softmax f(t'))`` (no image involved);
2. image: 10 sign steps of size ``eps / 10 * 1.25`` from a **one-sided** random start
   ``x + eps * U(0, 1)`` (their ``random_init``), maximising per image::

       KL(softmax F(x) || softmax F(x'))  +  3.0 * KL(softmax norm T_adv || softmax norm F(x'))

   (``torch.nn.KLDivLoss(input.log_softmax, target.softmax)`` in their code: the first
   term on raw image embeddings, the second on L2-normalised ones), the last iterate
   returned.

REFERENCE-NOTES writes the objective as ``KL(F(x')||F(x)) + 3.0*KL(norm F(x')||norm T_adv)``;
the code's argument order puts the clean/text distribution first, which is what is
implemented (the sign of every step is the same kind of ascent either way).

Both terms are *ascended*: the image moves away from its clean embedding and away from
its adversarial captions. The first KL (raw embeddings) grows with the distance moved
while the second (softmaxes of unit vectors) stays nearly flat, so with a larger eps the
first term's gradient decides most sign steps and the attack drifts towards an
untargeted embedding-change attack; recall can then *rise* with eps (measured in
docs/attacks.md, "Why Co-attack's recall can rise with eps"). That is the reference
objective, kept as it is.

Deviation: Co-attack's retrieval evaluation attacks each (image, caption) pair
separately and the image of the last pair overwrites the others; here an image is
guided by *all* of its adversarial captions at once (the mean of the per-caption KL
terms), so every caption counts and each image is attacked once.

Example::

    out = co_attack(model, images, captions, eps=2 / 255, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.attacks.base import AttackOutput, frozen_eval
from trainables.attacks.projection import project_linf
from trainables.attacks.text_attack import TextAttackSettings, embedding_kl, encode_texts, flatten_captions, regroup, text_attack
from trainables.attacks.text_candidates import CandidateSource, OfflineCandidates


def co_attack(model, images: torch.Tensor, captions: list[tuple[str, ...]], eps: float, generator: torch.Generator,
              steps: int = 10, alpha: float = 3.0, candidates: CandidateSource | None = None,
              text_settings: TextAttackSettings = TextAttackSettings()) -> AttackOutput:
    """Co-attack on a batch: adversarial captions, then adversarial images. See the module docstring.

    Args:
        model: the attacked model (white-box) or a surrogate (transfer).
        images: (B, 3, H, W) in [0, 1]; captions[b]: the captions of image b.
        eps: L-inf budget in [0, 1] pixel units (Co-attack: 2/255); step = eps / steps * 1.25.
        generator: seeds the one-sided random start and the offline candidates.
        steps: image steps (10); alpha: weight of the adversarial-text term (3.0).
        candidates: word source; None = :class:`OfflineCandidates` of ``model``.
        text_settings: budget (1 word), optional similarity filter (none in Co-attack).
    Returns:
        AttackOutput with images (B, 3, H, W), captions (same structure), text_source.
    """
    images = images.detach()
    with frozen_eval(model):
        source = candidates if candidates is not None else OfflineCandidates(model)
        flat, owner = flatten_captions(captions)
        original_text = encode_texts(model, flat, text_settings.batch_size)
        adversarial_texts = text_attack(
            model, flat, lambda features, index: embedding_kl(original_text[index.to(original_text.device)], features),
            source, generator, text_settings)
        text_unit = F.normalize(encode_texts(model, adversarial_texts, text_settings.batch_size), dim=-1)
        adversarial = co_attack_images(model, images, text_unit, owner, eps, generator, steps, alpha)
    return AttackOutput(images=adversarial, captions=regroup(adversarial_texts, captions), text_source=source.name)


def caption_weights(owner: torch.Tensor, count: int, device: torch.device) -> torch.Tensor:
    """(B, T): 1 / (captions of image b) where caption t belongs to image b, else 0 (the mean over an image's captions)."""
    membership = (owner.to(device).unsqueeze(0) == torch.arange(count, device=device).unsqueeze(1)).float()
    return membership / membership.sum(dim=1, keepdim=True).clamp_min(1.0)


def co_attack_terms(features: torch.Tensor, clean_features: torch.Tensor, text_unit: torch.Tensor,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-attack's two image terms per image: ``KL(softmax F(x) || softmax F(x'))`` and the mean over b's captions
    of ``KL(softmax norm T_adv || softmax norm F(x'))``.

    Args:
        features: (B, D) raw ``F(x')``; clean_features: (B, D) raw ``F(x)``; text_unit: (T, D) L2-normalised
            adversarial caption features; weights: (B, T) from :func:`caption_weights`.
    """
    clean_term = embedding_kl(clean_features, features)  # (B,)
    text_log_p = text_unit.log_softmax(dim=-1)  # (T, D)
    log_q = F.normalize(features, dim=-1).log_softmax(dim=-1)  # (B, D)
    # KL(p_t || q_b) for every caption t and image b: sum_d p_t (log p_t - log q_b)
    pairwise = (text_log_p.exp() * text_log_p).sum(dim=-1).unsqueeze(0) - log_q @ text_log_p.exp().T  # (B, T)
    return clean_term, (weights * pairwise).sum(dim=1)


def co_attack_images(model, images: torch.Tensor, text_unit: torch.Tensor, owner: torch.Tensor, eps: float,
                     generator: torch.Generator, steps: int = 10, alpha: float = 3.0) -> torch.Tensor:
    """Co-attack's image half: ``steps`` sign-ascent steps of ``eps / steps * 1.25`` on
    ``clean_term + alpha * text_term`` (:func:`co_attack_terms`) from the one-sided start ``x + eps * U(0, 1)``.

    Args:
        images: (B, 3, H, W) clean, in [0, 1]; text_unit: (T, D) normalised adversarial caption features;
            owner: (T,) the image index of each caption.
    Returns:
        (B, 3, H, W) adversarial images (the last iterate).
    """
    weights = caption_weights(owner, len(images), images.device)
    with torch.no_grad():
        clean_features = model.encode_image(images).float()
    noise = torch.rand(images.shape, generator=generator, device=generator.device, dtype=images.dtype).to(images.device)
    adversarial = project_linf(images + eps * noise, images, eps)  # one-sided start U(0, eps), as in their code
    step_size = eps / steps * 1.25
    for _ in range(steps):
        adversarial.requires_grad_(True)
        clean_term, text_term = co_attack_terms(model.encode_image(adversarial).float(), clean_features, text_unit, weights)
        (gradient,) = torch.autograd.grad((clean_term + alpha * text_term).sum(), adversarial)
        with torch.no_grad():
            adversarial = project_linf(adversarial + step_size * gradient.sign(), images, eps)
    return adversarial.detach()
