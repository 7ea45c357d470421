"""Loading a fine-tuned (robust) vision encoder back into its base model.

A robust checkpoint is the ``vision.safetensors`` a training run writes (see
``trainables.checkpoint``), given either as its directory or as the file itself. If a
JSON card ``card.json`` sits beside the file and records ``{"sha256": ...}``, the file
must hash to it: a truncated or tampered file is refused before any weight is used.

Only ``model.vision`` changes. ``model.vision_original`` keeps the base model's
weights, so F_org (and therefore L_SCA and FARE's target) stays the original encoder.
"""

from __future__ import annotations

from pathlib import Path

from trainables.checkpoint import VISION_FILE
from trainables.errors import UserError
from trainables.models.base import VLPModel
from trainables.models.weights import CARD_FILE, file_sha256, load_strict, read_state_dict, verify_card

__all__ = ["CARD_FILE", "file_sha256", "load_robust_vision", "robust_vision_file", "verify_card"]


def robust_vision_file(path: str | Path) -> Path:
    """The safetensors file a checkpoint path names: ``DIR/vision.safetensors`` or the file itself."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        path = path / VISION_FILE
        if not path.is_file():
            raise UserError(f"{path.parent} has no {VISION_FILE}: point to a checkpoint folder written by training, or to the .safetensors file")
        return path
    if not path.exists():
        raise UserError(f"robust vision checkpoint {path} does not exist: give a checkpoint folder or its {VISION_FILE}")
    if path.suffix != ".safetensors":
        raise UserError(f"robust vision checkpoint {path} is not a .safetensors file: give the {VISION_FILE} a training run wrote (or its folder)")
    return path


def load_robust_vision(model: VLPModel, path: str | Path) -> Path:
    """Load a fine-tuned vision checkpoint into ``model.vision`` strictly; returns the file loaded.

    Raises:
        UserError: no such file, a hash mismatch with ``card.json``, or keys/shapes that do
            not fit ``model.vision`` (the message names them, e.g. a checkpoint of another base model).
    """
    weights = robust_vision_file(path)
    # read_state_dict checks the card's sha256 (trainables.models.weights.verify_card) before reading.
    load_strict(model.vision, read_state_dict(weights), source=f"{weights} (into the vision encoder of {model.spec})")
    return weights
