"""ALBEF's vision encoder (``models/vit.py:VisionTransformer``) with its exact state-dict key names.

A pre-norm ViT with a CLS token and learned position embeddings, no head and no pooling:
``forward`` returns every output token ``(B, 1 + grid**2, width)`` after the final
LayerNorm; the CLS token is token 0. Keys: ``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``. ALBEF builds it with ``qkv_bias=True`` and LayerNorm eps 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VIT_LAYER_NORM_EPS = 1e-6  # ALBEF: norm_layer=partial(nn.LayerNorm, eps=1e-6)


@dataclass(frozen=True)
class VitConfig:
    """Sizes of an ALBEF ViT; ``grid`` = image_size // patch_size patches per side."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_hidden: int = 3072

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a strided convolution, flattened to (B, patches, width)."""

    def __init__(self, config: VitConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (ALBEF/timm layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        # scaled_dot_product_attention uses head_dim ** -0.5, ALBEF's scale.
        context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(context.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, config: VitConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, eps=VIT_LAYER_NORM_EPS)
        self.attn = Attention(config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width, eps=VIT_LAYER_NORM_EPS)
        self.mlp = Mlp(config.width, config.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AlbefViT(nn.Module):
    """ALBEF's ``VisionTransformer``: normalised pixels -> all output tokens (B, 1 + grid**2, width)."""

    def __init__(self, config: VitConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"ViT width {config.width} is not divisible by {config.heads} heads")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid**2, config.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.width, eps=VIT_LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """ALBEF's ``interpolate_pos_embed``: resample (1, 1 + g*g, W) position embeddings to a ``grid`` x ``grid`` grid.

    The CLS row is kept; the patch rows are reshaped to the checkpoint's square grid and
    resized bicubically (``align_corners=False``); the input is returned unchanged when
    the grids already match.
    """
    patches = pos_embed.shape[1] - 1
    old_grid = int(round(patches**0.5))
    if old_grid * old_grid != patches:
        raise ValueError(f"pos_embed has {patches} patch rows, not a square grid")
    if old_grid == grid:
        return pos_embed
    width = pos_embed.shape[-1]
    rows = pos_embed[:, 1:].reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    rows = F.interpolate(rows.float(), size=(grid, grid), mode="bicubic", align_corners=False).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], rows.permute(0, 2, 3, 1).reshape(1, grid * grid, width)], dim=1)
