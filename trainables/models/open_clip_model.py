"""open_clip's ``CLIP`` class behind the platform's model interface."""

from __future__ import annotations

import open_clip
import torch
from torch import nn

from trainables.models.base import VLPModel


class OpenClipVLP(VLPModel):
    """An open_clip CLIP: ``vision`` is ``clip.visual`` (ViT incl. projection); the text side is frozen.

    The visual tower is detached from the CLIP object so its weights are held (and
    saved) once, under ``vision``; ``CLIP.encode_text`` does not touch ``visual``.
    """

    family = "clip"

    def __init__(self, clip: open_clip.model.CLIP, tokenizer, spec: str):
        preprocess = open_clip.get_model_preprocess_cfg(clip)
        image_size = preprocess["size"]
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        vision = clip.visual
        clip.visual = None
        super().__init__(vision=vision, image_size=int(image_size), mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]))
        self.clip_text = clip
        self.tokenizer = tokenizer
        self.spec = spec
        self.freeze_text()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.pixel_mean.device)
        return self.clip_text.encode_text(tokens)

    @property
    def logit_scale(self) -> float:
        return float(self.clip_text.logit_scale.exp().clamp(max=100.0))

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The full open_clip state dict (``visual.*`` plus the text side), as open_clip saves it."""
        state = {f"visual.{k}": v for k, v in self.vision.state_dict().items()}
        state.update({k: v for k, v in self.clip_text.state_dict().items()})
        return state


def build_open_clip(clip: nn.Module, spec: str, context_length: int | None = None) -> OpenClipVLP:
    """Wrap a constructed open_clip model with the tokenizer matching its text config."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length or clip.context_length)
    return OpenClipVLP(clip, tokenizer, spec)
