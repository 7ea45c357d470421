"""A naive reference MAVA step: the same mathematics as ``trainables.steps.mava_step``, none of its savings.

This is the baseline of ``benchmarks/mava_step.py`` and the oracle of
``tests/test_step_performance.py`` (the optimised step must produce the same loss
terms and the same parameter update). It is written the straightforward way,
from the paper's equations, as a first implementation would be.

It is **not** the authors' code (that is ``benchmarks/authors_mava.py``, and
``neighbours: authors_pgd2`` in training). It makes every interpretive choice the
platform's step makes, which the authors' code makes differently (REFERENCE-NOTES,
MAVA): plain sign-gradient PGD with a random start (``mava_random_start``; the
authors' ``pgd_2`` starts at the clean image and steps with a Nesterov look-ahead
momentum), Eq. 5 at r = 0, and N views for L_VSSE and L_CMS: the paper's uniform
neighbours ``v' + r_i``, or the last N plain-PGD iterates (``neighbours:
last_iterates``), where the authors average the last N+1 ``pgd_2`` iterates into
one image. Its variants of the loss (``embedding_space``, ``cms_form``,
``sca_half``, ``inner_text_distance``) are the platform's named options, not a
copy of the authors' loss code. ``neighbours: authors_pgd2`` is refused here.
Its naive parts:

1. **Frozen features every step.** The M captions of every image go through the
   frozen text encoder (tokenised again) and the clean images through the frozen
   original encoder ``F_org`` at every step, although neither changes during
   training. (The optimised loop computes both once per dataset:
   ``trainables.train.frozen_features``.)
2. **PGD with ``loss.backward()``**: every one of the K steps back-propagates into
   the vision encoder's *parameters* as well as the input, and the parameter
   gradients are thrown away (``zero_grad``) because only ``x.grad`` is used. (The
   released ``pgd_2`` calls ``torch.autograd.grad`` instead, see
   ``benchmarks/authors_mava.py``; the optimised PGD differentiates detached
   weights, so no weight-gradient kernel runs at all.)
3. **One view at a time.** The N neighbours and the clean image go through the
   encoder one forward pass each in a Python loop; the single ``loss.backward()``
   of the caller then runs one backward pass per view graph. (The optimised step
   stacks the (N+1)*B views into one batch.)
4. The loss terms are computed per neighbour in a loop, directly from Eqs. 2-5
   (``trainables.defenses.mava`` is not used, so the equivalence test also
   cross-checks the vectorised loss code).

Nothing else is slowed down on purpose: same model, same batch, same precision,
same generator draws in the same order (PGD random start if any, then the neighbour
noise as one (B, N, C, H, W) draw), same projection onto the eps-ball.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.attacks.projection import project_linf, random_start
from trainables.config import EmbeddingSpace, NeighbourMode, TrainConfig
from trainables.defenses.mava import CmsForm
from trainables.models.base import VLPModel


def _distance(a: torch.Tensor, b: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Per-image ``||a - b||^2`` (optionally of the L2-normalised vectors): (B, D), (B, D) -> (B,)."""
    if normalized:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return ((a - b) ** 2).sum(dim=-1)


def _cms(image_features: torch.Tensor, caption_features: torch.Tensor, form: CmsForm) -> torch.Tensor:
    """Eq. 3 per image, one caption at a time: (B, D), (B, M, D) -> (B,)."""
    cosines = [F.cosine_similarity(image_features, caption_features[:, i], dim=-1) for i in range(caption_features.shape[1])]
    if form is CmsForm.NEG_COS_SUM:
        return -sum(cosines)
    return sum(1.0 - cos for cos in cosines) / len(cosines)


def _inner_loss(features: torch.Tensor, original: torch.Tensor, captions: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Eq. 5 per image at the current iterate (the neighbourhood collapsed to it, as in the optimised step)."""
    normalized = config.embedding_space is EmbeddingSpace.NORMALIZED
    loss = _cms(features, captions, config.cms_form) + _distance(features, original, normalized)
    if config.inner_text_distance:
        loss = loss + _distance(features, captions.mean(dim=1), normalized)
    return loss


def naive_pgd(model: VLPModel, images: torch.Tensor, original: torch.Tensor, captions: torch.Tensor, config: TrainConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """K signed-gradient steps on Eq. 5 with ``loss.backward()``; returns the last iterate and all iterates."""
    images = images.detach()
    adversarial = random_start(images, config.eps, generator) if config.mava_random_start else images.clone()
    iterates = []
    for _ in range(config.pgd_steps):
        adversarial = adversarial.detach().requires_grad_(True)
        loss = _inner_loss(model.encode_image(adversarial), original, captions, config).sum()
        loss.backward()  # fills the parameters' .grad too; only the input's is used
        model.vision.zero_grad(set_to_none=True)  # ... and those parameter gradients are thrown away
        with torch.no_grad():
            adversarial = project_linf(adversarial + config.pgd_step_size * adversarial.grad.sign(), images, config.eps)
        iterates.append(adversarial)
    return adversarial.detach(), iterates


def naive_mava_step(model: VLPModel, images: torch.Tensor, captions: list[tuple[str, ...]], config: TrainConfig,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One MAVA step (Eqs. 2-6), the naive way; returns the batch-mean terms (the caller backpropagates ``loss``).

    Args:
        model: the model; ``model.vision`` is trained, ``model.vision_original`` gives ``F_org``.
        images: (B, C, H, W) clean images in [0, 1]; captions[b]: the captions of image b (the first M are used).
        generator: the same generator state as given to the optimised step gives the same draws.
    """
    if config.neighbours is NeighbourMode.AUTHORS_PGD2:
        raise ValueError("naive_mava_step reads the paper's neighbours (uniform or last_iterates); "
                         "the authors' pgd_2 step is benchmarks/authors_mava.py")
    normalized = config.embedding_space is EmbeddingSpace.NORMALIZED
    batch = len(images)
    with torch.no_grad():  # frozen encoders, recomputed at every step
        texts = [caption for group in captions for caption in group[: config.M]]
        caption_features = model.encode_text(texts).view(batch, config.M, -1)
        original = model.encode_image_original(images)

    adversarial, iterates = naive_pgd(model, images, original, caption_features, config, generator)
    if config.neighbours is NeighbourMode.LAST_ITERATES:
        neighbours = [iterate.detach() for iterate in iterates[-config.N:]]
        neighbours = [neighbours[0]] * (config.N - len(neighbours)) + neighbours
    else:
        # One (B, N, C, H, W) draw, as trainables.defenses.mava.sample_neighbours consumes the generator.
        radius = config.beta * config.eps
        noise = torch.rand((batch, config.N, *images.shape[1:]), generator=generator, device=generator.device, dtype=images.dtype)
        noise = noise.to(images.device) * (2 * radius) - radius
        neighbours = [(adversarial + noise[:, i]).clamp(0.0, 1.0) for i in range(config.N)]

    neighbour_features = [model.encode_image(view) for view in neighbours]  # one forward per neighbour
    clean_features = model.encode_image(images)
    mean_neighbour = sum(neighbour_features) / config.N
    l_cms = _cms(mean_neighbour, caption_features, config.cms_form).mean()  # Eq. 3
    l_vsse = (sum(_distance(f, original, normalized) for f in neighbour_features) / config.N).mean()  # Eq. 2
    l_sca = _distance(clean_features, original, normalized)  # Eq. 4
    l_sca = (0.5 * l_sca if config.sca_half else l_sca).mean()
    loss = config.a * l_cms + config.b * l_vsse + config.c * l_sca  # Eq. 6
    return {"loss": loss, "l_cms": l_cms, "l_vsse": l_vsse, "l_sca": l_sca}
