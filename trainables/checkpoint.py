"""Training checkpoints as safetensors + JSON: nothing in them is ever unpickled.

A checkpoint directory holds
  ``vision.safetensors``    the fine-tuned vision encoder (what users share),
  ``optimizer.safetensors`` the optimiser's per-parameter tensors,
  ``state.json``            epoch, optimiser hyperparameters, config and metrics.
Each epoch's data order and attack noise are functions of (seed, epoch), so the
epoch number is all the loop needs to continue exactly where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainables.errors import UserError
from trainables.models.weights import load_strict
from trainables.names import EPOCH, OPTIMIZER_FILE, STATE_FILE, VISION_FILE

__all__ = ["OPTIMIZER_FILE", "STATE_FILE", "VISION_FILE", "load_training_checkpoint", "read_checkpoint_state",
           "save_training_checkpoint"]


def save_training_checkpoint(directory: Path, vision: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                             config: dict, metrics: dict[str, float]) -> Path:
    """Write the checkpoint of a finished ``epoch`` (1-based) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in vision.state_dict().items()}, str(directory / VISION_FILE))
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().contiguous().cpu()
        for index, slots in optimizer_state["state"].items()
        for name, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    scalars = {
        str(index): {name: value for name, value in slots.items() if not isinstance(value, torch.Tensor)}
        for index, slots in optimizer_state["state"].items()
    }
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    state = {EPOCH: epoch, "param_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars,
             "config": config, "metrics": metrics}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
    return directory


def read_checkpoint_state(directory: Path) -> dict:
    """The ``state.json`` of a checkpoint: ``{"epoch", "metrics", "config", ...}``."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no {STATE_FILE}: it is incomplete; resume from an earlier checkpoint")
    return json.loads(path.read_text())


def load_training_checkpoint(directory: Path, vision: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore vision weights and optimiser state from ``directory``; returns the finished epoch."""
    for name in (VISION_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (directory / name).is_file():
            raise UserError(f"checkpoint {directory} has no {name}: it is incomplete; resume from an earlier checkpoint")
    load_strict(vision, load_file(str(directory / VISION_FILE)), source=str(directory / VISION_FILE))
    state = read_checkpoint_state(directory)
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    slots: dict[int, dict] = {int(index): dict(values) for index, values in state["optimizer_scalars"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    return int(state[EPOCH])
