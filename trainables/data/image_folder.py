"""Decoding image files into [0, 1] tensors: RGB, shorter side resized (bicubic), centre crop.

This is the evaluation transform of CLIP-style models *without* the normalisation
(the model normalises inside ``encode_image``), so attacks work in pixel space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainables.errors import UserError

# What PIL raises for unreadable, truncated or hostile files. UnidentifiedImageError
# is an OSError; SyntaxError and ValueError come from a few broken-header paths in
# PIL's plugins; DecompressionBombError is PIL's guard against huge images.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side of ``image`` to ``size`` (bicubic), then crop the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    # max(size, ...) guards against rounding the shorter side to size - 1.
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def decode_image(path: Path, size: int, listed_in: Path) -> torch.Tensor:
    """Read ``path`` as a (3, size, size) float32 tensor in [0, 1].

    Raises:
        UserError: the file cannot be read or decoded; the message names ``path`` and the
            annotation file ``listed_in`` that refers to it.
    """
    try:
        with Image.open(path) as opened:
            # convert() forces the full decode inside the try, so truncated files fail here.
            image = opened.convert("RGB")
    except _DECODE_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        raise UserError(
            f"image '{path}' listed in {listed_in} could not be decoded ({reason}): "
            "check the file or remove it from the annotation file"
        ) from error
    return pil_to_tensor(resize_center_crop(image, size))
