"""The MAVA authors' inner attack ``pgd_2``: look-ahead momentum PGD, the last N+1 iterates averaged.

Source read: ``wangyouze/MAVA``, ``adversarial_robustness/CLIP/adversarial_training_image_encoder.py``
(``pgd_2``, called with ``decay=1.0`` and the MAVA ``N``). What it computes, with
``x`` the clean images, ``alpha`` the step size and ``g_0 = 0``:

1. ``x_0 = x``: no random start;
2. for t = 0 .. K-1: the gradient ``d`` of the objective at the Nesterov look-ahead
   ``x_t + decay * alpha * g_t`` (a pixel point that may leave the eps-ball and [0, 1]:
   the script feeds it to the encoder as it is), taken with respect to ``x_t``
   (the same tensor: the look-ahead is ``x_t`` plus a constant); ``d`` divided by its
   mean absolute value over each image; ``g_{t+1} = d / mean|d| + decay * g_t``;
   ``x_{t+1}`` = ``x_t + alpha * sign(g_{t+1})`` projected onto the eps-ball and [0, 1];
3. the result is **one** image per input: the pixel mean of the last N+1 iterates
   ``x_{K-N} .. x_K``. The MAVA step then encodes it once, ``F(x_avg)``, for L_VSSE and
   L_CMS (the paper's N neighbours ``v' + r_i`` do not exist in that code).

Deviations, none of which changes a finite result: the objective is a per-image loss
summed over the batch where the script takes a batch mean (the per-image normalisation
cancels any per-batch factor); ``pgd_2``'s ``v`` (always zero) is dropped; an image
whose gradient is exactly zero everywhere takes no step (the script divides 0 by 0
and produces NaN pixels); the projection is ``project_linf`` (exact in floating point)
and the average is projected again, so ``||x_avg - x||_inf <= eps`` holds exactly,
not only up to rounding. ``pgd_2`` with more iterates than steps averages fewer
images than it divides by; here ``average > steps`` is refused.

Example::

    objective = lambda x: mava_inner_loss(encode(x), original, captions)     # (B,)
    x_avg = pgd2_average(objective, images, PGDSettings(eps=2/255, random_start=False), average=N + 1)
"""

from __future__ import annotations

from typing import Callable

import torch

from trainables.attacks.pgd import PGDSettings
from trainables.attacks.projection import project_linf

AUTHORS_DECAY = 1.0  # pgd_2's momentum decay as the training script calls it


def pgd2_average(
    objective: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: PGDSettings,
    average: int,
    decay: float = AUTHORS_DECAY,
) -> torch.Tensor:
    """Maximise ``objective`` with ``pgd_2``'s look-ahead momentum steps; the mean of the last ``average`` iterates.

    Args:
        objective: images (B, C, H, W) -> per-image losses (B,) to *maximise*.
        images: (B, C, H, W) clean images in [0, 1].
        settings: eps, steps (K) and step size; ``random_start`` must be False (``pgd_2`` has none).
        average: how many of the last iterates to average (the MAVA authors: N + 1), 1 <= average <= K.
        decay: the momentum decay (the authors: 1.0).
    Returns:
        (B, C, H, W) averaged adversarial images, ``||x_avg - x||_inf <= eps``, in [0, 1].
    """
    if settings.random_start:
        raise ValueError("pgd_2 starts at the clean image: pass PGDSettings(random_start=False)")
    if not 1 <= average <= settings.steps:
        raise ValueError(f"cannot average the last {average} of {settings.steps} iterates: need 1 <= average <= steps")
    images = images.detach()
    adversarial = images.clone()
    momentum = torch.zeros_like(images)
    total = torch.zeros_like(images)
    for step in range(settings.steps):
        look_ahead = (adversarial + decay * settings.step_size * momentum).requires_grad_(True)
        (gradient,) = torch.autograd.grad(objective(look_ahead).sum(), look_ahead)
        with torch.no_grad():
            scale = gradient.abs().mean(dim=tuple(range(1, gradient.dim())), keepdim=True)
            # An all-zero gradient stays zero instead of becoming 0/0 = NaN.
            momentum = gradient / scale.clamp_min(torch.finfo(scale.dtype).tiny) + decay * momentum
            adversarial = project_linf(adversarial + settings.step_size * momentum.sign(), images, settings.eps)
            if step >= settings.steps - average:
                total += adversarial
    # The mean of points of a convex set lies in it; projecting again removes the rounding of the sum.
    return project_linf(total / average, images, settings.eps)
