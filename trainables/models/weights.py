"""Reading weight files without ever unpickling arbitrary objects.

safetensors files are read as tensors only. Legacy ``.pt``/``.bin``/``.pth``
files (official releases) go through ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers. Loading into a model is
strict: a key mismatch is reported by name instead of silently ignored (the
MAVA reference code's ``strict=False`` hid exactly such bugs).

If a JSON card ``card.json`` (written beside every published robust encoder, see
``platform/tracking.py``) sits beside a weights file and records a ``sha256`` for
it, the file must hash to that value before any tensor is read: a truncated or
tampered file is refused with a message naming both hashes. A content-addressed file
(``NAME-sha256-<hex>.safetensors``, how embedded base models reach every worker, see
``trainables/models/embedded.py``) is checked against the hash in its own name the same way.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trainables.errors import UserError
from trainables.names import CARD_FILE

LEGACY_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *LEGACY_SUFFIXES)
# A file whose name carries the sha256 of its bytes: NAME-sha256-<64 hex>.safetensors.
CONTENT_ADDRESSED = re.compile(r"-sha256-(?P<sha256>[0-9a-f]{64})\.safetensors$")
_SHOWN_KEYS = 8
_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (encoders are hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_card(weights: Path) -> str | None:
    """Check ``weights`` against the sha256 in the ``card.json`` beside it; returns the hash checked, or None.

    A card vouches for the file it names in ``weights_file`` (any file when it names none);
    without a card, or a card without ``sha256``, there is nothing to check.

    Raises:
        UserError: the card is unreadable, or the file does not hash to the card's sha256.
    """
    weights = Path(weights)
    card_path = weights.parent / CARD_FILE
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"card {card_path} is not valid JSON ({error}): restore it, or remove it to skip the hash check") from None
    if not isinstance(card, dict):
        raise UserError(f"card {card_path} is not a JSON object: restore it, or remove it to skip the hash check")
    if "sha256" not in card or card.get("weights_file", weights.name) != weights.name:
        return None  # a card without a hash (or for another file) documents the run but cannot vouch for this file
    expected = str(card["sha256"]).lower()
    found = file_sha256(weights)
    if found != expected:
        raise UserError(
            f"{weights} does not match the sha256 in {card_path} (card {expected}, file {found}): the file was "
            "modified or truncated after the card was written; copy the checkpoint again from its source"
        )
    return found


def content_addressed_name(stem: str, sha256: str) -> str:
    """``("tiny-clip", "ab12...") -> "tiny-clip-sha256-ab12....safetensors"``."""
    return f"{stem}-sha256-{sha256}.safetensors"


def verify_content_address(weights: Path) -> str | None:
    """Check a content-addressed file against the sha256 in its name; returns the hash checked, or None for other names.

    Raises:
        UserError: the file does not hash to the sha256 its name carries.
    """
    match = CONTENT_ADDRESSED.search(Path(weights).name)
    if match is None:
        return None
    found = file_sha256(weights)
    if found != match["sha256"]:
        raise UserError(f"{weights} does not hash to the sha256 in its name (file {found}): it was modified or copied "
                        "incompletely; delete it and start the run again, which writes it anew from its source")
    return found


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (safetensors, or a legacy torch file read with weights_only).

    A ``card.json`` beside the file with a ``sha256``, or a sha256 in the file's own name,
    is checked first (:func:`verify_card`, :func:`verify_content_address`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: check the path in the model spec (MODEL@/abs/path/to/weights)")
    if path.suffix in WEIGHT_SUFFIXES:
        verify_card(path)
        verify_content_address(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise UserError(f"weights file {path} is not a valid safetensors file ({error}): re-export or re-download it") from None
    if path.suffix in LEGACY_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"weights file {path} could not be read safely with torch.load(weights_only=True) ({first_line}): "
                "convert it to safetensors, or to a plain state_dict of tensors"
            ) from None
        return _unwrap_state_dict(loaded, path)
    raise UserError(f"weights file {path} has unsupported suffix {path.suffix!r}: use .safetensors or one of {', '.join(LEGACY_SUFFIXES)}")


def _unwrap_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    # Training scripts save {"state_dict": ...} or {"model": ...}; DDP adds "module." prefixes.
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in loaded and isinstance(loaded[key], dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"weights file {path} does not hold a state_dict of tensors: save model.state_dict() instead")
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``module``; on any mismatch raise a UserError naming the keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOWN_KEYS])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:_SHOWN_KEYS])})")
        if wrong_shape:
            shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong_shape[:_SHOWN_KEYS]]
            parts.append(f"{len(wrong_shape)} with another shape ({'; '.join(shapes)})")
        raise UserError(
            f"weights in {source} do not match the architecture: {'; '.join(parts)}. "
            "Check that the model name in the spec is the architecture these weights were trained with"
        )
    module.load_state_dict(state_dict, strict=True)
