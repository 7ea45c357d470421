"""What every dataset yields: one image in [0, 1] pixel space with its captions and an id.

Images stop *before* normalisation (the model normalises inside ``encode_image``),
so attacks and ``eps`` work in pixel space; a test asserts the range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageCaptionItem:
    """One image and all of its captions.

    Attributes:
        image: float32 tensor (3, H, W) with values in [0, 1], H = W = the model's image size.
        captions: every caption of the image (MSCOCO/Flickr30k have 5, a few COCO images more).
        item_id: a stable id (file name for real data, ``synthetic-<split>-<index>`` for the world).
    """

    image: torch.Tensor
    captions: tuple[str, ...]
    item_id: str


@dataclass(frozen=True)
class Batch:
    """A collated batch: images (B, 3, H, W) in [0, 1], captions[b] the captions of image b."""

    images: torch.Tensor
    captions: list[tuple[str, ...]]
    item_ids: list[str]


def collate(items: list[ImageCaptionItem]) -> Batch:
    """Stack items into a :class:`Batch` (use as a DataLoader ``collate_fn``)."""
    return Batch(
        images=torch.stack([item.image for item in items]),
        captions=[item.captions for item in items],
        item_ids=[item.item_id for item in items],
    )
