"""Loading a fine-tuned (robust) vision encoder back into its base model.

A robust checkpoint is the ``vision.safetensors`` a training run writes (see
``trainables.checkpoint``), given either as its directory or as the file itself. If a
JSON card ``card.json`` sits beside the file and records ``{"sha256": ...}``, the file
must hash to it: a truncated or tampered file is refused before any weight is used.

Only ``model.vision`` changes. ``model.vision_original`` keeps the base model's
weights, so F_org (and therefore L_SCA and FARE's target) stays the original encoder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trainables.checkpoint import VISION_FILE
from trainables.errors import UserError
from trainables.models.base import VLPModel
from trainables.models.weights import load_strict, read_state_dict

CARD_FILE = "card.json"
_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (encoders are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def verify_card(weights: Path) -> str | None:
    """Check ``weights`` against the sha256 in the ``card.json`` beside it; returns the hash checked, or None without one."""
    card_path = weights.parent / CARD_FILE
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"card {card_path} is not valid JSON ({error}): restore it, or remove it to skip the hash check") from None
    if not isinstance(card, dict):
        raise UserError(f"card {card_path} is not a JSON object: restore it, or remove it to skip the hash check")
    if "sha256" not in card:
        return None  # a card without a hash documents the run but cannot vouch for the file
    expected = str(card["sha256"]).lower()
    found = file_sha256(weights)
    if found != expected:
        raise UserError(
            f"{weights} does not match the sha256 in {card_path} (card {expected}, file {found}): the file was "
            "modified or truncated after the card was written; copy the checkpoint again from its source"
        )
    return found


def load_robust_vision(model: VLPModel, path: str | Path) -> Path:
    """Load a fine-tuned vision checkpoint into ``model.vision`` strictly; returns the file loaded.

    Raises:
        UserError: no such file, a hash mismatch with ``card.json``, or keys/shapes that do
            not fit ``model.vision`` (the message names them, e.g. a checkpoint of another base model).
    """
    weights = robust_vision_file(path)
    verify_card(weights)
    load_strict(model.vision, read_state_dict(weights), source=f"{weights} (into the vision encoder of {model.spec})")
    return weights
