"""The FARE training step as RobustVLM's script runs it: the ``fare_authors`` baseline of ``mava_step.py``.

Source read: ``chs20/RobustVLM``, ``train/adversarial_training_clip.py`` (``train_one_epoch``
with ``--attack pgd --loss l2 --clean_weight 0``, FARE's setting) and ``train/pgd_train.py``.
For one batch of B images it reproduces every piece of work that step does, in order:

1. ``F_org`` of the clean images through the original encoder, ``no_grad``, **every step**;
2. PGD, K iterations, from ``U(-eps, eps)``: forward of ``x + delta``, loss ``l2`` (squared
   error summed over dims, mean over the batch), ``torch.autograd.grad(loss, delta)`` with
   the encoder's parameters requiring gradients (as released), a NaN check of the gradient
   (``gradient.isnan().any()``: a host sync per iteration), ``sign``, velocity
   ``0.9 v + g`` and its sign, the step, ``clamp`` to the eps-box and the pixel box, then the
   script's two asserts (NaN and pixel range: more host syncs);
3. ``model.train()``, a **clean forward with gradients** (``embedding_clean``: with
   ``clean_weight = 0`` it is not in the loss, but the script computes it every step for
   its logged cosine), the adversarial forward, the loss, backward, optimiser step;
4. the per-step logging: two cosine similarities and ``loss.item()``, ``cos_sim.item()``;
   ``torch.cuda.empty_cache()`` (CUDA only, done by the caller after the optimiser step).

As for MAVA, the issue's "``backward()`` in PGD" is not the released code (it calls
``torch.autograd.grad``); ``pgd_gradient="backward"`` gives that reading for comparison.
Not reproduced: DataParallel, the data loader, wandb, the periodic APGD evaluation and
checkpoints (they are not part of a training step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.authors_mava import PGD_GRADIENTS
from trainables.config import TrainConfig
from trainables.models.base import VLPModel


def _l2(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, targets, reduction="none").sum(dim=1).mean()


def robustvlm_pgd(model: VLPModel, images: torch.Tensor, original: torch.Tensor, config: TrainConfig, generator: torch.Generator,
                  momentum: float = 0.9, pgd_gradient: str = "autograd") -> torch.Tensor:
    """``pgd_train.pgd`` with ``norm='linf'``, ``mode='max'`` and the script's uniform start."""
    if pgd_gradient not in PGD_GRADIENTS:
        raise ValueError(f"pgd_gradient must be one of {PGD_GRADIENTS}, not {pgd_gradient!r}")
    eps, step = config.eps, config.pgd_step_size
    noise = torch.rand(images.shape, generator=generator, device=generator.device, dtype=images.dtype).to(images.device)
    perturbation = (noise * 2 * eps - eps).requires_grad_(True)
    velocity = torch.zeros_like(images)
    for _ in range(config.pgd_steps):
        perturbation.requires_grad_(True)
        loss = _l2(model.encode_image(images + perturbation), original)
        if pgd_gradient == "autograd":
            (gradient,) = torch.autograd.grad(loss, perturbation)
        else:
            loss.backward()
            gradient = perturbation.grad
            model.vision.zero_grad(set_to_none=True)
        with torch.no_grad():
            if gradient.isnan().any():
                gradient[gradient.isnan()] = 0.0
            gradient = gradient.sign()
            velocity = (momentum * velocity + gradient).sign()
            perturbation = torch.clamp(perturbation + step * velocity, -eps, eps)
            perturbation = torch.clamp(images + perturbation, 0, 1) - images
            assert not perturbation.isnan().any()
            assert torch.max(images + perturbation) < 1.0 + 1e-6 and torch.min(images + perturbation) > -1e-6
    return images + perturbation.detach()


def robustvlm_fare_step(model: VLPModel, images: torch.Tensor, config: TrainConfig, generator: torch.Generator,
                        pgd_gradient: str = "autograd") -> dict[str, torch.Tensor]:
    """One FARE step of RobustVLM's script; returns ``{"loss", "l_fare"}`` (the caller backpropagates ``loss``).

    The logged cosines are read here with ``.item()`` as the script does every step.
    """
    with torch.no_grad():
        original = model.encode_image_original(images)
    model.vision.eval()
    adversarial = robustvlm_pgd(model, images, original, config, generator, pgd_gradient=pgd_gradient)
    model.vision.train()
    clean = model.encode_image(images)  # with gradients, outside the loss (clean_weight = 0)
    features = model.encode_image(adversarial)
    loss = _l2(features, original)
    with torch.no_grad():
        cos_clean = F.cosine_similarity(clean, original, dim=1).mean()
        cos_adversarial = F.cosine_similarity(features, original, dim=1).mean()
    cos_clean.item(), cos_adversarial.item()
    return {"loss": loss, "l_fare": loss}
