"""The MAVA training step as the authors' released CLIP script runs it: the ``authors`` baseline of ``mava_step.py``.

Source read: ``wangyouze/MAVA``, ``adversarial_robustness/CLIP/adversarial_training_image_encoder.py``
(``train_one_epoch`` and ``pgd_2``). For one batch of B distinct images it reproduces,
in the same order, every piece of *work* that step does:

1. **Repeat**: ``images.repeat_interleave(M, dim=0)``: B*M images go through
   everything below (one row per caption).
2. **Frozen features every step** (``no_grad``): ``F_org`` of the B*M images
   through the original encoder and the B*M captions through the text encoder,
   both L2-normalised.
3. **Clean forward with gradients** on the B*M images *before* the attack (its graph
   is kept alive through PGD and back-propagated at the end).
4. **``pgd_2``**, K iterations, no random start: a Nesterov look-ahead
   ``x + decay * step * momentum`` (decay 1.0) is encoded, the inner loss is
   ``l2(F, F_org) + l2(F, T) + loss_multi_view(F, T)`` on normalised features, the
   gradient is ``torch.autograd.grad(cost, x)`` **with the encoder's parameters
   requiring gradients** (as released: the script sets ``requires_grad=True`` on
   every visual parameter and never turns it off for the attack), divided by its
   mean absolute value per image, accumulated into the momentum, and a sign step of
   1/255 is projected with ``clamp``. The last N+1 iterates are averaged into the one
   adversarial view. As in the script, that average requires gradients (``pgd_2``
   sets ``requires_grad`` on each iterate after storing it), so the outer backward
   also computes the gradient of the pixels.
5. **Outer step**: one forward with gradients of the averaged view (B*M images);
   loss ``b*l2(adv, F_org) + c*l2(clean, F_org) + a*loss_multi_view(adv, T)``, one
   backward through both graphs, the optimiser step.
6. ``loss_multi_view`` as written: a (B*M, B*M) similarity matrix and a label matrix
   filled one entry at a time in a Python loop (B*M small writes, K+1 times per step);
   ``torch.cuda.empty_cache()`` at the end of every step (CUDA only).

The issue and ``naive_mava.py`` say the authors' PGD calls ``loss.backward()``; the
released ``pgd_2`` calls ``torch.autograd.grad(cost, adv_images)``, which in eager
mode skips the weight-gradient kernels although the parameters require gradients.
``pgd_gradient="autograd"`` (the default, used for ``speedup_vs_authors``) is the
released code; ``pgd_gradient="backward"`` calls ``cost.backward()`` and discards the
parameter gradients, the reading of the issue, counted beside it.

Deliberately **not** reproduced (documented bugs of that script, REFERENCE-NOTES
"MAVA"; none changes the amount of work): BERT token ids fed to CLIP's text encoder
(each model's own tokenizer is used: same 77-token context for CLIP), unnormalised
pixels (``model.encode_image`` normalises; one elementwise op), fp16 weights (the
benchmark's precision is used for every variant), DDP (the script calls
``model.module`` directly, so DDP syncs nothing), the data loader, prints, wandb.
The label matrix keeps the script's indexing, so its L_CMS term uses the misaligned
captions (bug 3): it is computed for its cost, never for its value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.config import TrainConfig
from trainables.models.base import VLPModel

PGD_GRADIENTS = ("autograd", "backward")


def _l2(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The script's ``l2(..., reduction='mean')``: squared error summed over dims, mean over rows."""
    return F.mse_loss(out, targets, reduction="none").sum(dim=1).mean()


def _loss_multi_view(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: list[int]) -> torch.Tensor:
    """The script's ``loss_multi_view``: -(similarity * labels) summed per row, mean over rows.

    The label matrix is filled entry by entry in Python, as written (its cost is part of the step).
    """
    similarity = image_features @ text_features.T
    labels = torch.zeros(similarity.shape, device=image_features.device)
    for index, image in enumerate(text_to_image):
        labels[image, index] = 1
    return -(similarity * labels).sum(-1).mean()


def end_of_step(device: torch.device) -> None:
    """What the script (and RobustVLM's) does after ``optimizer.step()``: ``torch.cuda.empty_cache()``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _unit(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True)


def authors_pgd(model: VLPModel, images: torch.Tensor, inner, config: TrainConfig, decay: float = 1.0,
                pgd_gradient: str = "autograd") -> torch.Tensor:
    """``pgd_2``: look-ahead sign steps with momentum; returns the mean of the last N+1 iterates.

    Args:
        images: (B*M, C, H, W) repeated clean images; inner: normalised features -> scalar cost to maximise.
        pgd_gradient: ``autograd`` (the released code) or ``backward`` (``cost.backward()``, parameter
            gradients computed and discarded).
    """
    if pgd_gradient not in PGD_GRADIENTS:
        raise ValueError(f"pgd_gradient must be one of {PGD_GRADIENTS}, not {pgd_gradient!r}")
    images = images.detach()
    step, eps = config.pgd_step_size, config.eps
    momentum = torch.zeros_like(images)
    variance = torch.zeros_like(images)  # pgd_2's `v`: never updated, kept for its arithmetic
    adversarial = images.clone()
    iterates = []
    for _ in range(config.pgd_steps):
        adversarial.requires_grad_(True)
        look_ahead = adversarial + decay * step * momentum
        cost = inner(_unit(model.encode_image(look_ahead)))
        if pgd_gradient == "autograd":
            (gradient,) = torch.autograd.grad(cost, adversarial)
        else:
            cost.backward()
            gradient = adversarial.grad
            model.vision.zero_grad(set_to_none=True)
        with torch.no_grad():
            gradient = (gradient + variance) / (gradient + variance).abs().mean(dim=(1, 2, 3), keepdim=True)
            gradient = gradient + momentum * decay
            momentum = gradient
            adversarial = adversarial.detach() + step * gradient.sign()
            delta = torch.clamp(adversarial - images, min=-eps, max=eps)
            adversarial = torch.clamp(images + delta, min=0, max=1).detach()
        iterates.append(adversarial)
    if config.N == 0:
        return adversarial
    count = config.N + 1
    average = torch.zeros_like(adversarial)
    for iterate in iterates[config.pgd_steps - count:]:
        average += iterate
    return average / count


def authors_mava_step(model: VLPModel, images: torch.Tensor, captions: list[tuple[str, ...]], config: TrainConfig,
                      pgd_gradient: str = "autograd") -> dict[str, torch.Tensor]:
    """One MAVA step of the authors' CLIP script on B distinct images; returns the terms (the caller backpropagates ``loss``).

    Args:
        model: ``model.vision`` is trained (its parameters require gradients); ``vision_original`` gives ``F_org``.
        images: (B, C, H, W) in [0, 1]; captions[b]: the captions of image b (the first M are used).
        config: K, N, M, eps, step size and the weights a, b, c of the outer loss.
    """
    m = config.M
    repeated = images.repeat_interleave(m, dim=0)
    texts = [caption for group in captions for caption in group[:m]]
    text_to_image = [index for index, group in enumerate(captions) for _ in group[:m]]
    with torch.no_grad():
        original = _unit(model.encode_image_original(repeated))
        text_features = _unit(model.encode_text(texts))
    clean = _unit(model.encode_image(repeated))  # with gradients, before the attack

    def inner(features: torch.Tensor) -> torch.Tensor:
        return _l2(features, original) + _l2(features, text_features) + _loss_multi_view(features, text_features, text_to_image)

    model.vision.eval()
    adversarial_view = authors_pgd(model, repeated, inner, config, pgd_gradient=pgd_gradient)
    model.vision.train()  # the script leaves eval mode on; a ViT computes the same either way
    adversarial = _unit(model.encode_image(adversarial_view))
    l_vsse = _l2(adversarial, original)
    l_cms = _loss_multi_view(adversarial, text_features, text_to_image)
    l_sca = _l2(clean, original)
    loss = config.b * l_vsse + config.c * l_sca + config.a * l_cms
    return {"loss": loss, "l_cms": l_cms, "l_vsse": l_vsse, "l_sca": l_sca}
