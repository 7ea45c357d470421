"""Decoding an image squashed to a square (ALBEF's test transform), keeping its original size.

ALBEF's VE and grounding evaluations resize the whole image to ``image_res x image_res``
(``transforms.Resize((res, res), BICUBIC)``, no crop). Grounding needs exactly that:
the GradCAM grid must cover the whole original image so that it can be upsampled
back onto the proposals' pixel coordinates, which a centre crop would cut.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from trainables.data.image_folder import _DECODE_ERRORS, pil_to_tensor
from trainables.errors import UserError


def decode_squashed(path: Path, size: int, listed_in: Path) -> tuple[torch.Tensor, tuple[int, int]]:
    """``path`` as a (3, size, size) tensor in [0, 1] (bicubic squash) and its original (height, width).

    Raises:
        UserError: the file cannot be decoded; names ``path`` and the annotation file ``listed_in``.
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # forces the full decode inside the try
    except _DECODE_ERRORS as error:
        raise UserError(
            f"image '{path}' listed in {listed_in} could not be decoded ({type(error).__name__}: {error}): "
            "check the file or remove it from the annotation file"
        ) from error
    width, height = image.size
    if (width, height) != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return pil_to_tensor(image), (height, width)
