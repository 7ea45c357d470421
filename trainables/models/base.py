"""The one interface every vision-language model exposes to defenses, attacks and evaluation.

Contract (DESIGN.md): images enter in **[0, 1] pixel space** and are normalised
inside ``encode_image``, so every attack works in pixel space and ``eps`` means
what the paper means. Texts enter as strings and are tokenised inside
``encode_text`` with the model's own tokenizer. Only ``vision`` is trained; a
frozen copy of the original vision encoder provides ``F_org``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import nn

from trainables.tasks import Task


class VisionTower(nn.Module):
    """Maps normalised pixels to image embeddings; the only trainable part of a model."""


class VLPModel(nn.Module, ABC):
    """A vision-language model behind the platform's interface.

    Attributes:
        spec: the model spec string it was loaded from (recorded with every result).
        family: a short family name used for grouping runs (``clip``, ``blip``...).
        tasks: the tasks it can be fine-tuned and evaluated for, its main one first (trainables.tasks).
        vision: the trainable vision encoder: normalised pixels -> embedding.
        vision_original: a frozen copy of ``vision`` as loaded (``F_org``).
        image_size: side length in pixels that ``encode_image`` expects.
    """

    spec: str
    family: str
    tasks: tuple[Task, ...] = (Task.RETRIEVAL,)
    has_text_encoder: bool = True  # False for captioning models: MAVA then uses Eq. 8 (a = 0)
    # How retrieval is scored with an ITM head (trainables.evaluation.rerank): None = ITC cosine only;
    # "itc+itm" = the top-k_test re-scored by ITC + ITM logit (BLIP); "itm" = by the ITM logit alone (ALBEF, TCL).
    itm_scoring: str | None = None

    def __init__(self, vision: nn.Module, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.vision = vision
        self.vision_original = copy.deepcopy(vision).requires_grad_(False).eval()
        self.image_size = image_size
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, H, W) -> the normalised input the vision tower was trained on."""
        return (pixels - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, D), raw (not L2-normalised), from [0, 1] pixels (B, 3, H, W)."""
        return self.vision(self.normalize(pixels))

    @torch.no_grad()
    def encode_image_original(self, pixels: torch.Tensor) -> torch.Tensor:
        """``F_org``: embeddings of the frozen original vision encoder (no gradient)."""
        return self.vision_original(self.normalize(pixels))

    @abstractmethod
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings (len(texts), D), raw, tokenised with the model's own tokenizer."""

    def text_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen text side (everything except the vision towers)."""
        vision_ids = {id(p) for p in self.vision.parameters()} | {id(p) for p in self.vision_original.parameters()}
        return [p for p in self.parameters() if id(p) not in vision_ids]

    def freeze_text(self) -> None:
        """Freeze the text side: the platform only ever fine-tunes the vision encoder."""
        for parameter in self.text_parameters():
            parameter.requires_grad_(False)

    @property
    def logit_scale(self) -> float:
        """Temperature used to turn cosine similarities into logits (TeCoA's cross-entropy)."""
        return 100.0
