"""Reading weight files without ever unpickling arbitrary objects.

safetensors files are read as tensors only. Legacy ``.pt``/``.bin``/``.pth``
files (official releases) go through ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers. Loading into a model is
strict: a key mismatch is reported by name instead of silently ignored (the
MAVA reference code's ``strict=False`` hid exactly such bugs).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from trainables.errors import UserError

LEGACY_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOWN_KEYS = 8


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (safetensors, or a legacy torch file read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: check the path in the model spec (MODEL@/abs/path/to/weights)")
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
