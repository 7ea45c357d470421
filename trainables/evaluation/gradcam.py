"""ALBEF's GradCAM over a fusion layer's cross-attention, without touching parameter gradients.

ALBEF's weakly supervised grounding (``salesforce/ALBEF:Grounding.py:val``,
``--gradcam_mode itm --block_num 8``) takes the cross-attention probabilities
``A`` of one fusion layer, shape (B, heads, text_len, 1 + patches) (the image
``[CLS]`` first), and the gradient ``G = dS/dA`` of the ITM match logit ``S``:

    cam = (A[..., 1:] * clamp(G[..., 1:], min=0)) * text_mask    # (B, heads, L, patches)
    map = cam.mean(heads).mean(text positions)                   # (B, grid, grid)

i.e. the mean over heads, then over *all* ``L`` text positions of the batch (padded
positions contribute zeros but still count in the denominator, as ALBEF's
``.mean(1).mean(1)`` does; the per-item scale does not change which proposal wins).

Deviations from the reference code, on purpose:

* ``torch.autograd.grad(S.sum(), A)`` instead of ``loss.backward()`` with a saved
  hook: only the attention's gradient is computed, so no parameter's ``.grad`` is
  created or changed (the platform's attack invariant). The attention must be part
  of an autograd graph: compute it from image tokens that require grad (e.g.
  ``tokens.detach().requires_grad_()``) when the model's parameters are frozen.
* heads and the grid come from the tensor (``grid = sqrt(patches)``), not ALBEF's
  hard-coded 12 and 24.

Example:
    >>> attention = torch.softmax(torch.randn(2, 3, 5, 17, requires_grad=True), -1)
    >>> score = attention[:, :, 0, 6].sum(dim=1)           # (B,) depends on patch 5
    >>> gradcam_map(score, attention).shape
    torch.Size([2, 4, 4])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_grid(num_patches: int) -> int:
    """The side of the square patch grid (``num_patches = grid ** 2``), or ValueError."""
    grid = math.isqrt(num_patches)
    if num_patches < 1 or grid * grid != num_patches:
        raise ValueError(f"{num_patches} image patches do not form a square grid: is the image [CLS] token dropped correctly?")
    return grid


def gradcam_map(
    score: torch.Tensor,
    attention: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    has_cls_token: bool = True,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """ALBEF's GradCAM of ``score`` over one cross-attention map, per image.

    Args:
        score: (B,) per-item scalar (ALBEF: the ITM match logit ``itm_head(fusion CLS)[:, 1]``);
            item b's score must depend only on item b's attention (true in eval mode).
        attention: (B, heads, L, tokens) attention probabilities, in the graph of ``score``.
        text_mask: (B, L) text attention mask (1 = real token, 0 = padding); None = all real.
        has_cls_token: the first image token is the image ``[CLS]`` (dropped, as ALBEF does).
        image_size: (height, width) to upsample the map to bicubically; None keeps the grid.

    Returns:
        (B, grid, grid) or (B, height, width) map, detached. The graph is kept
        (``retain_graph=True``), so the caller may still differentiate ``score``.
    """
    if score.dim() != 1 or attention.dim() != 4 or score.shape[0] != attention.shape[0]:
        raise ValueError(f"score must be (B,) and attention (B, heads, L, tokens); got {tuple(score.shape)} and {tuple(attention.shape)}")
    if not attention.requires_grad:
        raise ValueError(
            "the attention map is not part of an autograd graph: compute it from image tokens that require grad "
            "(tokens.detach().requires_grad_()) and outside torch.no_grad()"
        )
    # autograd.grad returns the gradient without accumulating into any leaf's .grad.
    (grad,) = torch.autograd.grad(score.sum(), attention, retain_graph=True)
    with torch.no_grad():
        cams, grads = attention.detach(), grad
        if has_cls_token:
            cams, grads = cams[..., 1:], grads[..., 1:]
        batch, _, length, patches = cams.shape
        grid = patch_grid(patches)
        cam = cams * grads.clamp(min=0)
        if text_mask is not None:
            if tuple(text_mask.shape) != (batch, length):
                raise ValueError(f"text_mask must be (B, L) = {(batch, length)}, got {tuple(text_mask.shape)}")
            cam = cam * text_mask.to(cam.dtype).view(batch, 1, length, 1)
        result = cam.mean(dim=1).mean(dim=1).view(batch, grid, grid)
        if image_size is not None:
            result = upsample_map(result, image_size)
    return result


def upsample_map(maps: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """(B, g, g) or (g, g) -> (B, H, W) or (H, W), bicubic as ALBEF's ``grounding_eval``.

    Bicubic interpolation can undershoot below 0 near sharp peaks; values are kept as
    they are (ALBEF does not clamp either).
    """
    single = maps.dim() == 2
    batch = maps.unsqueeze(0) if single else maps
    height, width = image_size
    out = F.interpolate(batch.unsqueeze(1).to(torch.float32), size=(int(height), int(width)), mode="bicubic", align_corners=False)
    out = out.squeeze(1)
    return out[0] if single else out


def heat_overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] blended with a black-red-yellow-white heat scale of (B, H, W) maps.

    Each map is clamped at 0 (GradCAM keeps positive evidence only) and scaled to its own
    maximum, as ALBEF's and the paper's visualisations are: the picture says *where* the model
    looks, not how strongly (compare scores, not colours, across images). A map with no positive
    value is drawn black (no evidence anywhere).
    """
    if images.dim() != 4 or maps.dim() != 3 or images.shape[0] != maps.shape[0] or images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"images must be (B, 3, H, W) and maps (B, H, W) of the same size; got {tuple(images.shape)} and {tuple(maps.shape)}")
    heat = maps.detach().float().clamp(min=0)
    heat = heat / heat.flatten(1).amax(dim=1).clamp(min=torch.finfo(heat.dtype).tiny).view(-1, 1, 1)
    colour = torch.stack([(3 * heat).clamp(0, 1), (3 * heat - 1).clamp(0, 1), (3 * heat - 2).clamp(0, 1)], dim=1)
    return ((1 - alpha) * images.detach().float().to(colour.device) + alpha * colour).clamp(0, 1)
