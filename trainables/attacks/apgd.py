"""APGD (Croce & Hein, ICML 2020): step-size-free L-inf PGD with momentum and checkpoints.

Algorithm (AutoAttack's ``APGDAttack``, L-inf, one restart, no EOT):

* start ``x0 = x + eps * t / ||t||_inf`` with ``t ~ U(-1, 1)`` per image, clipped to [0, 1];
  step size ``eta = 2 * eps`` per image;
* each iteration ``z = P(x_k + eta * sign(grad))`` and
  ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))`` (the first step is the plain
  projected sign step);
* checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0, p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``: at each, an image whose loss rose in at
  most 75% of the steps since the last checkpoint, or whose best loss did not improve while
  its step was not halved last time, gets ``eta / 2`` and restarts from its best point;
* the **best** point (highest loss seen, start included) is returned.

Objective for retrieval: ``1 - mean cosine`` of the image to its own captions (the loss
PGD uses), or, as an option, the cross-entropy of ``logit_scale * cos`` over the batch's
caption centroids with the image's own as the label (TeCoA's reading of CLIP
retrieval as classification; with a batch of one it is constant and gives no gradient).

Example::

    objective = lambda x: retrieval_loss(model.encode_image(x), centroids)   # (B,)
    adversarial = apgd(objective, images, APGDSettings(eps=4 / 255, steps=100), generator)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch
import torch.nn.functional as F

from trainables.attacks.base import AttackOutput, caption_centroids, frozen_eval, retrieval_loss
from trainables.attacks.projection import project_linf


class ApgdLoss(str, Enum):
    RETRIEVAL = "retrieval"  # 1 - mean cosine to the image's own captions (default)
    CE = "ce"  # cross-entropy over the batch's caption centroids


@dataclass(frozen=True)
class APGDSettings:
    """Fields: eps (pixel units in [0, 1]); steps N (AutoAttack: 100); momentum alpha (0.75);
    rho, the share of increasing steps below which the step is halved (0.75); checkpoint
    schedule p_1 = 0.22, shrinking by 0.03 to a floor of 0.06 (fractions of N)."""

    eps: float = 4 / 255
    steps: int = 100
    momentum: float = 0.75
    rho: float = 0.75
    first_checkpoint: float = 0.22
    checkpoint_decrease: float = 0.03
    min_checkpoint_gap: float = 0.06


def checkpoints(settings: APGDSettings) -> list[int]:
    """Iterations (0-based, < N) after which the step size is reconsidered: ``ceil(p_j N)``."""
    fractions = [0.0, settings.first_checkpoint]
    while fractions[-1] < 1.0:
        gap = max(fractions[-1] - fractions[-2] - settings.checkpoint_decrease, settings.min_checkpoint_gap)
        fractions.append(fractions[-1] + gap)
    # round first: 0.22 * 100 is 22.000000000000004 in floating point, and its ceil must be 22
    points = sorted({math.ceil(round(p * settings.steps, 6)) for p in fractions[1:]})
    return [w for w in points if 0 < w <= settings.steps]


def apgd(objective: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, settings: APGDSettings,
         generator: torch.Generator) -> torch.Tensor:
    """Maximise the per-image ``objective`` over the eps-ball around ``images``; return the best points.

    Args:
        objective: images (B, C, H, W) -> per-image losses (B,) to maximise.
        images: (B, C, H, W) clean images in [0, 1].
        settings: eps, steps and the schedule constants.
        generator: seeds the random start (deterministic given it).
    Returns:
        (B, C, H, W) with ``||x_adv - x||_inf <= eps``, values in [0, 1]: each image's highest-loss iterate.
    """
    images = images.detach()
    eps = settings.eps
    batch = images.shape[0]
    shape = (batch,) + (1,) * (images.dim() - 1)

    def loss_and_gradient(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        losses = objective(x)
        (gradient,) = torch.autograd.grad(losses.sum(), x)
        return losses.detach().float(), gradient.detach()

    t = 2 * torch.rand(images.shape, generator=generator, device=generator.device, dtype=images.dtype).to(images.device) - 1
    t_norm = t.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(shape)
    x = project_linf(images + eps * t / t_norm, images, eps)
    loss, gradient = loss_and_gradient(x)
    best_x, best_loss, best_gradient = x.clone(), loss.clone(), gradient.clone()
    step = torch.full(shape, 2 * eps, device=images.device, dtype=images.dtype)
    previous_x = x.clone()
    history = [loss]  # loss after each iterate, starting point included
    marks = checkpoints(settings)
    last_mark = 0
    best_at_last_mark = best_loss.clone()
    halved_at_last_mark = torch.ones(batch, dtype=torch.bool, device=images.device)

    for iteration in range(settings.steps):
        with torch.no_grad():
            mix = settings.momentum if iteration > 0 else 1.0
            z = project_linf(x + step * gradient.sign(), images, eps)
            candidate = x + mix * (z - x) + (1 - mix) * (x - previous_x)
            previous_x = x
            x = project_linf(candidate, images, eps)
        loss, gradient = loss_and_gradient(x)
        history.append(loss)
        with torch.no_grad():
            improved = loss > best_loss
            best_x = torch.where(improved.view(shape), x, best_x)
            best_gradient = torch.where(improved.view(shape), gradient, best_gradient)
            best_loss = torch.where(improved, loss, best_loss)
            if iteration + 1 in marks:
                window = torch.stack(history[last_mark:iteration + 2])  # losses from the last checkpoint on
                increases = (window[1:] > window[:-1]).float().sum(dim=0)
                oscillating = increases <= settings.rho * (iteration + 1 - last_mark)
                stalled = (~halved_at_last_mark) & (best_at_last_mark >= best_loss)
                halve = oscillating | stalled
                step = torch.where(halve.view(shape), step / 2, step)
                # restart the halved images from their best point (and its gradient); like the
                # reference code, the momentum term then points from the previous iterate to it
                x = torch.where(halve.view(shape), best_x, x)
                gradient = torch.where(halve.view(shape), best_gradient, gradient)
                halved_at_last_mark = halve
                best_at_last_mark = best_loss.clone()
                last_mark = iteration + 1
    return best_x.detach()


def centroid_cross_entropy(image_features: torch.Tensor, centroids: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Per-image CE of ``logit_scale * cos(F(x_b), centroid_j)`` over the batch's centroids j, label b."""
    logits = logit_scale * F.normalize(image_features.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")


def apgd_retrieval_attack(model, images: torch.Tensor, captions: list[tuple[str, ...]], eps: float,
                          generator: torch.Generator, steps: int = 100, loss: ApgdLoss = ApgdLoss.RETRIEVAL) -> AttackOutput:
    """APGD against retrieval (image only). See the module docstring.

    Args:
        model: the attacked model (white-box) or a surrogate (transfer).
        images: (B, 3, H, W) in [0, 1]; captions[b]: the captions of image b (clean, untouched).
        eps: L-inf budget in pixel units; steps: N (100 as in AutoAttack).
        loss: ``retrieval`` (1 - mean cosine to own captions) or ``ce`` over the batch's caption centroids.
    """
    loss = ApgdLoss(loss)
    with frozen_eval(model):
        centroids = caption_centroids(model, captions)
        if loss is ApgdLoss.RETRIEVAL:
            def objective(x: torch.Tensor) -> torch.Tensor:
                return retrieval_loss(model.encode_image(x), centroids)
        else:
            scale = model.logit_scale

            def objective(x: torch.Tensor) -> torch.Tensor:
                return centroid_cross_entropy(model.encode_image(x), centroids, scale)
        adversarial = apgd(objective, images, APGDSettings(eps=eps, steps=steps), generator)
    return AttackOutput(images=adversarial)


def apgd_ce_attack(model, images: torch.Tensor, captions: list[tuple[str, ...]], eps: float,
                   generator: torch.Generator, steps: int = 100) -> AttackOutput:
    """APGD with the cross-entropy over the batch's caption centroids (the ``ce`` option)."""
    return apgd_retrieval_attack(model, images, captions, eps, generator, steps=steps, loss=ApgdLoss.CE)
