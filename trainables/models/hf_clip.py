"""``hf-clip:/dir``: a Hugging Face ``transformers.CLIPModel`` from a local directory.

The directory is what ``model.save_pretrained(dir)`` and ``tokenizer.save_pretrained(dir)``
(or ``processor.save_pretrained(dir)``) write, e.g. a copy of ``openai/clip-vit-base-patch16``.
Nothing is downloaded: every transformers call passes ``local_files_only=True``.

This module also holds the helpers for reading such a directory that ``hf_blip``
shares: checking that it holds the declared architecture, loading weights strictly,
finding the tokenizer and the image mean/std.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
from torch import nn

from trainables.errors import UserError
from trainables.models.base import VisionTower, VLPModel

if TYPE_CHECKING:  # transformers' model classes cost ~0.75 s to import: only the loaders that need them import them
    from transformers import CLIPModel, PreTrainedModel, PreTrainedTokenizerBase

# Which spec kind loads which transformers architecture (to tell users what a directory is).
ARCHITECTURE_KINDS = {
    "CLIPModel": "hf-clip",
    "BlipForImageTextRetrieval": "hf-blip-itr",
    "BlipForConditionalGeneration": "hf-blip-cap",
}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")
_SHOWN_KEYS = 8


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_model_config(path: Path, kind: str, architecture: str, model_type: str) -> dict:
    """``config.json`` of ``path``, after checking the directory holds ``architecture``.

    A directory of another kind is refused with what it holds and the spec kind that loads it.
    """
    if not path.exists():
        raise UserError(f"model directory {path} in spec '{kind}:{path}' does not exist: check the path after '{kind}:'")
    if not path.is_dir():
        raise UserError(f"{path} in spec '{kind}:{path}' is a file: {kind}: takes the folder written by save_pretrained()")
    config_path = path / "config.json"
    if not config_path.is_file():
        if (path / "open_clip_config.json").is_file():
            raise UserError(
                f"{path} holds an open_clip model (open_clip_config.json), not a transformers one: "
                f"use open_clip:ARCHITECTURE@{path}/open_clip_model.safetensors"
            )
        raise UserError(
            f"{path} has no config.json, so it is not a Hugging Face transformers model folder: "
            f"point {kind}: at the folder written by {architecture}.save_pretrained()"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path} is not valid JSON ({error}): re-save the model with save_pretrained()") from None
    # Both fields are optional in config.json: older or hand-written configs omit them.
    found = list(config["architectures"]) if "architectures" in config else []
    found_type = config["model_type"] if "model_type" in config else None
    if architecture in found or (not found and found_type == model_type):
        return config
    kinds = [ARCHITECTURE_KINDS[name] for name in found if name in ARCHITECTURE_KINDS]
    what = ", ".join(found) if found else f"model of model_type {found_type!r}"
    fix = f"use {kinds[0]}:{path}" if kinds else f"{kind}: needs a folder saved from transformers.{architecture}"
    raise UserError(f"{path} holds a {what} (per its config.json), not a {architecture}: {fix}")


def load_pretrained(model_class: type[PreTrainedModel], path: Path) -> PreTrainedModel:
    """``model_class.from_pretrained(path)`` offline, in float32, refusing missing or reshaped weights.

    transformers would otherwise initialise missing weights randomly with only a log line;
    that is the silent failure ``load_strict`` exists to prevent. Unexpected (unused)
    keys are tolerated: real checkpoints carry a few, e.g. ``position_ids`` buffers.
    """
    try:
        model, info = model_class.from_pretrained(
            path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32,
        )
    except OSError as error:
        raise UserError(
            f"could not load {model_class.__name__} weights from {path} ({_first_line(error)}): the folder needs "
            "config.json and model.safetensors (or pytorch_model.bin) as written by save_pretrained()"
        ) from None
    parts = []
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOWN_KEYS])})")
    if info["mismatched_keys"]:
        # transformers reports (key, shape in the file, shape the config builds).
        mismatched = sorted(f"{key}: file {tuple(found)} vs config {tuple(built)}" for key, found, built in info["mismatched_keys"])
        parts.append(f"{len(mismatched)} with another shape (e.g. {', '.join(mismatched[:_SHOWN_KEYS])})")
    if parts:
        raise UserError(
            f"weights in {path} do not match its config.json ({model_class.__name__}): {'; '.join(parts)}. "
            "The weight files and config.json must come from the same save_pretrained() call"
        )
    return model


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``path`` (never a default one: transformers would build a near-empty vocabulary)."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise UserError(
            f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): save the model's tokenizer or "
            f"processor into the same folder with tokenizer.save_pretrained('{path}')"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the tokenizer in {path} ({_first_line(error)}): re-save it with save_pretrained()") from None


def image_statistics(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) from the saved image processor, else CLIP's OpenAI values.

    Older folders hold ``preprocessor_config.json``; transformers 5 writes
    ``processor_config.json`` with an ``image_processor`` section. Without either we
    use OpenAI's CLIP mean/std, which are also the defaults of transformers'
    ``CLIPImageProcessor`` and ``BlipImageProcessor`` (BLIP normalises like CLIP).
    """
    sources = [(path / "preprocessor_config.json", None), (path / "processor_config.json", "image_processor")]
    for source, section in sources:
        if not source.is_file():
            continue
        try:
            config = json.loads(source.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{source} is not valid JSON ({error}): re-save the processor with save_pretrained()") from None
        if section is not None:
            if section not in config:
                continue
            config = config[section]
        if "image_mean" in config and "image_std" in config:
            return tuple(float(v) for v in config["image_mean"]), tuple(float(v) for v in config["image_std"])
    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


class HfClipVision(VisionTower):
    """CLIP's vision transformer and its projection: normalised pixels -> ``image_embeds`` (B, D)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)


class HfClipVLP(VLPModel):
    """A transformers ``CLIPModel``: ``vision`` = vision_model + visual_projection; the text side is frozen.

    The towers are taken out of the ``CLIPModel`` so each weight is held (and saved) once.
    """

    family = "clip"
    has_text_encoder = True

    def __init__(self, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase, mean, std, spec: str):
        vision = HfClipVision(clip.vision_model, clip.visual_projection)
        super().__init__(vision=vision, image_size=int(clip.config.vision_config.image_size), mean=mean, std=std)
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        # Not called ``logit_scale``: that name is the interface's property.
        self.text_logit_scale = clip.logit_scale
        self.tokenizer = tokenizer
        self.context_length = int(clip.config.text_config.max_position_embeddings)
        self.spec = spec
        self.freeze_text()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt",
        ).to(self.pixel_mean.device)
        output = self.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.text_projection(output.pooler_output)

    @property
    def logit_scale(self) -> float:
        return float(self.text_logit_scale.exp().clamp(max=100.0))


def load_hf_clip(path: Path, spec: str) -> HfClipVLP:
    """The ``CLIPModel`` saved in ``path`` behind the platform interface."""
    from transformers import CLIPModel

    read_model_config(path, "hf-clip", "CLIPModel", "clip")
    clip = load_pretrained(CLIPModel, path)
    mean, std = image_statistics(path)
    return HfClipVLP(clip, load_tokenizer(path), mean, std, spec)
