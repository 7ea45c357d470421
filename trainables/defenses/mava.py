"""MAVA: Multi-granularity Aligned Visual Adversarial fine-tuning (Wang et al., paper Eqs. 2-7).

Pure tensor functions: features in, named per-sample loss terms out. No model calls,
no I/O. Shapes: B images, N neighbours, M captions, D embedding dims.

Sign conventions (REFERENCE-NOTES "Sign conventions"): every term is a *loss*. The
inner PGD maximises ``L_inner = L_CMS + L_VSSE`` (Eq. 5) and the outer step
minimises ``L_outer = a*L_CMS + b*L_VSSE + c*L_SCA`` (Eq. 6), exactly as TeCoA, FARE,
SGA and Co-attack maximise and minimise one loss. Eq. 3 writes L_CMS as a cosine
*similarity*; minimising a similarity would push images away from their captions,
so we write it as the loss ``1 - cos`` (default, range [0, 2]) or, as the authors'
code does, ``-cos`` summed over the M captions (``cms_form="neg_cos_sum"``). Either
way an inner (ascent) step lowers image-caption cosine and an outer (descent)
step raises it; tests check both directions.

Captioners (Eq. 8, App. A.4): a captioning model has no text encoder, so there are
no caption features and no L_CMS. ``caption_features=None`` selects this variant:
the inner PGD maximises L_VSSE alone and the outer loss is ``b*L_VSSE + c*L_SCA``;
the returned terms then have no ``l_cms`` entry, so the logged losses say which
equation produced them.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

from trainables.defenses.distances import squared_l2


class CmsForm(str, Enum):
    """How Eq. 3's cosine similarity becomes a loss."""

    ONE_MINUS_COS = "one_minus_cos"  # paper reading (default): mean over M of 1 - cos
    NEG_COS_SUM = "neg_cos_sum"  # authors' code: -(sum over M of cos)


def cms_loss(neighbour_features: torch.Tensor, caption_features: torch.Tensor, form: CmsForm = CmsForm.ONE_MINUS_COS) -> torch.Tensor:
    """L_CMS (Eq. 3) per image: alignment of the mean neighbour feature with each of the image's M captions.

    Args:
        neighbour_features: (B, N, D) features ``F(v' + r_j)``.
        caption_features: (B, M, D) frozen text features ``F(t_i)`` of the image's *own* captions
            (the authors' code misaligned these after repeating images; we never do).
    Returns:
        (B,) loss; lower means better aligned.
    """
    mean_neighbour = neighbour_features.mean(dim=1, keepdim=True)  # (B, 1, D): Eq. 3's (1/N) sum_j
    cos = F.cosine_similarity(mean_neighbour, caption_features, dim=-1)  # (B, M)
    if CmsForm(form) is CmsForm.NEG_COS_SUM:
        return -cos.sum(dim=1)
    return (1.0 - cos).mean(dim=1)


def vsse_loss(neighbour_features: torch.Tensor, original_features: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """L_VSSE (Eq. 2) per image: mean over N of ``||F(v' + r_i) - F_org(v)||^2``.

    Args:
        neighbour_features: (B, N, D); original_features: (B, D) from the frozen original encoder.
    """
    return squared_l2(neighbour_features, original_features.unsqueeze(1), normalized).mean(dim=1)


def sca_loss(clean_features: torch.Tensor, original_features: torch.Tensor, half: bool = True, normalized: bool = False) -> torch.Tensor:
    """L_SCA (Eq. 4) per image: ``0.5 ||F(v) - F_org(v)||^2`` (``half=False``: the authors' code, no 0.5)."""
    distance = squared_l2(clean_features, original_features, normalized)
    return 0.5 * distance if half else distance


def mava_inner_loss(
    adversarial_features: torch.Tensor,
    original_features: torch.Tensor,
    caption_features: torch.Tensor | None,
    cms_form: CmsForm = CmsForm.ONE_MINUS_COS,
    normalized: bool = False,
    inner_text_distance: bool = False,
) -> torch.Tensor:
    """Eq. 5, the objective the inner PGD *maximises*, per image.

    By default (``inner_neighbourhood: zero``, as the authors' code) the neighbourhood is
    collapsed to the current iterate (r = 0, one view): each PGD step costs one
    forward/backward, and the N neighbours are drawn once, around the final v', for the
    outer step. With ``inner_neighbourhood: neighbours`` (Eq. 5 as written) the caller
    passes the features of N neighbours of the iterate, (B, N, D).

    Args:
        adversarial_features: (B, D) ``F(v')`` at the current iterate, or (B, N, D) of its neighbours.
        caption_features: (B, M, D), or None for a captioner (Eq. 8): the objective is then L_VSSE alone.
        inner_text_distance: add ``||F(v') - mean caption feature||^2``, the extra
            inner term of the authors' code (off by default: not in the paper).
    """
    views = adversarial_features.unsqueeze(1) if adversarial_features.dim() == 2 else adversarial_features
    loss = vsse_loss(views, original_features, normalized)
    if caption_features is None:
        if inner_text_distance:
            raise ValueError("inner_text_distance needs caption features; a captioner (caption_features=None) has none")
        return loss
    loss = cms_loss(views, caption_features, cms_form) + loss
    if inner_text_distance:
        loss = loss + squared_l2(views.mean(dim=1), caption_features.mean(dim=1), normalized)
    return loss


def mava_outer_loss(
    neighbour_features: torch.Tensor,
    clean_features: torch.Tensor,
    original_features: torch.Tensor,
    caption_features: torch.Tensor | None,
    a: float,
    b: float,
    c: float,
    cms_form: CmsForm = CmsForm.ONE_MINUS_COS,
    normalized: bool = False,
    sca_half: bool = True,
) -> dict[str, torch.Tensor]:
    """Eq. 6 (Eq. 8 for a captioner), minimised by the outer step; returns the batch means of every term.

    Args:
        caption_features: (B, M, D), or None for a captioner: Eq. 8, where ``a`` must be 0
            (there is no L_CMS for it to weight).
    Returns:
        ``{"loss": a*L_CMS + b*L_VSSE + c*L_SCA, "l_cms": ..., "l_vsse": ..., "l_sca": ...}``,
        each a scalar (mean over the batch: the expectation over v in Eqs. 2-4); for a
        captioner ``{"loss": b*L_VSSE + c*L_SCA, "l_vsse": ..., "l_sca": ...}`` (no ``l_cms``).
    """
    l_vsse = vsse_loss(neighbour_features, original_features, normalized).mean()
    l_sca = sca_loss(clean_features, original_features, sca_half, normalized).mean()
    if caption_features is None:
        if a != 0:
            raise ValueError(f"a={a:g} weights L_CMS, but there are no caption features (Eq. 8, a captioner): pass a=0")
        return {"loss": b * l_vsse + c * l_sca, "l_vsse": l_vsse, "l_sca": l_sca}
    l_cms = cms_loss(neighbour_features, caption_features, cms_form).mean()
    return {"loss": a * l_cms + b * l_vsse + c * l_sca, "l_cms": l_cms, "l_vsse": l_vsse, "l_sca": l_sca}


def sample_neighbours(adversarial_images: torch.Tensor, count: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """The paper's neighbours ``v' + r_i``, ``r_i ~ U[-radius, radius]^d`` with radius = beta*eps.

    Args:
        adversarial_images: (B, C, H, W) in [0, 1].
    Returns:
        (B, count, C, H, W), clamped to [0, 1] so every neighbour is a valid image; with
        ``count = 0`` (no expansion: the paper's Figure 3 N = 0) the adversarial point alone, (B, 1, C, H, W).
    """
    if count == 0:
        return adversarial_images.unsqueeze(1)
    shape = (adversarial_images.shape[0], count, *adversarial_images.shape[1:])
    noise = torch.rand(shape, generator=generator, device=generator.device, dtype=adversarial_images.dtype)
    noise = noise.to(adversarial_images.device) * (2 * radius) - radius
    return (adversarial_images.unsqueeze(1) + noise).clamp(0.0, 1.0)
