"""The one device resolver: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a ``torch.device``, or a clear error.

The training loop (on every Ray Train worker), ``platform.evaluate`` and
``platform.evaluate_captions`` all resolve their ``device`` here, so a name means
the same everywhere and a device that cannot run is refused before any work.
"""

from __future__ import annotations

import re

import torch

from trainables.errors import UserError

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """``name`` if it is a device the platform can run on some machine (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        UserError: any other name (``gpu``, ``mps``, ...).
    """
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise UserError(f"unknown device {name!r}: use cpu, cuda (or cuda:N) or auto (cuda when available)")
    return name


def resolve_device(name: str) -> torch.device:
    """The device ``name`` means on this machine; ``auto`` is the current CUDA device when there is one, else the CPU.

    The current CUDA device, not ``cuda:0``: Ray Train sets it per worker.

    Raises:
        UserError: an unknown name, or a CUDA device on a machine without one (or without that index).
    """
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA device is available: use cpu (or auto)")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}, or auto")
    return device
