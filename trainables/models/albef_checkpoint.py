"""ALBEF/TCL checkpoint files: key renaming and dropping, sizes from shapes, ``config_bert.json``, bare ViT export.

Released files hold ``{'model': state_dict, 'optimizer': ..., 'config': ..., 'epoch': ...}``
or a bare state dict (ALBEF-TCL-NOTES §5); ``read_state_dict`` unwraps both with
``torch.load(weights_only=True)``. From the state dict:

* pre-training files (``text_encoder.bert.*``, ``text_encoder_m.bert.*``) lose ``bert.``
  as ALBEF's fine-tuning scripts do (``key.replace('bert.', '')``);
* keys used only in training are dropped by the explicit lists below (momentum copies,
  queues, the MLM head, the ``position_ids`` buffer); every other key must load strictly.

A robust vision encoder is exported in MAVA's and SGA's layout: the bare
``visual_encoder.state_dict()`` (keys ``cls_token``, ``blocks.0.attn.qkv.weight``, ...),
which is also what the platform's ``vision`` holds, so such a file loads as ``--checkpoint``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainables.errors import UserError
from trainables.models.albef_bert import BertConfig
from trainables.models.albef_vit import VitConfig, interpolate_pos_embed

CONFIG_FILE = "config_bert.json"
VIT_HEAD_WIDTH = 64  # ViT-B's head size: heads = width / 64 (ALBEF-TCL-NOTES §1.2)
# Momentum copies (model_pairs), and the pre-training MLM head after the 'bert.' rename.
TRAINING_ONLY_PREFIXES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "cls_head_m.",
                          "text_encoder.cls.")
TRAINING_ONLY_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "text_encoder.embeddings.position_ids")
RETRIEVAL_HEAD_KEYS = ("vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias",
                       "itm_head.weight", "itm_head.bias", "temp")
ENTAILMENT_HEAD_KEYS = ("cls_head.0.weight", "cls_head.0.bias", "cls_head.2.weight", "cls_head.2.bias")
_BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "fusion_layer", "encoder_width")
_PRETRAIN_PREFIXES = ("text_encoder.bert.", "text_encoder_m.bert.")


def inference_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with pre-training names renamed and training-only entries dropped."""
    renamed = {}
    for key, value in state.items():
        for prefix in _PRETRAIN_PREFIXES:
            if key.startswith(prefix):
                key = prefix.removesuffix("bert.") + key[len(prefix):]
        renamed[key] = value
    return {key: value for key, value in renamed.items()
            if key not in TRAINING_ONLY_KEYS and not key.startswith(TRAINING_ONLY_PREFIXES)}


def heads_of(state: dict[str, torch.Tensor], source: str) -> frozenset[str]:
    """Which task heads a checkpoint has: ``"itm"`` (retrieval: ITC projections + ITM) and/or ``"cls"`` (entailment)."""
    heads = set()
    if any(key.split(".")[0] in ("vision_proj", "text_proj", "itm_head", "temp") for key in state):
        heads.add("itm")
    if any(key.startswith("cls_head.") for key in state):
        heads.add("cls")
    if not heads:
        raise UserError(f"{source} has no ALBEF task head (none of {', '.join(RETRIEVAL_HEAD_KEYS + ENTAILMENT_HEAD_KEYS)}): "
                        "give a retrieval, pre-training or visual-entailment checkpoint of ALBEF or TCL")
    return frozenset(heads)


def _require(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{source} has no {key}: it is not an ALBEF/TCL checkpoint in the official key layout")
    return state[key]


def vit_config(state: dict[str, torch.Tensor], source: str, image_size: int | None = None) -> VitConfig:
    """ViT sizes from the checkpoint's shapes; ``image_size`` None keeps the checkpoint's own grid."""
    patch_weight = _require(state, "visual_encoder.patch_embed.proj.weight", source)
    width, _, patch, _ = patch_weight.shape
    tokens = _require(state, "visual_encoder.pos_embed", source).shape[1]
    grid = int(round((tokens - 1) ** 0.5))
    depth = 1 + max((int(m.group(1)) for key in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", key))), default=-1)
    mlp_hidden = _require(state, "visual_encoder.blocks.0.mlp.fc1.weight", source).shape[0]
    heads = max(1, width // VIT_HEAD_WIDTH)
    return VitConfig(image_size=image_size or grid * patch, patch_size=patch, width=width, depth=depth, heads=heads,
                     mlp_hidden=mlp_hidden)


def fit_pos_embed(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """``visual_encoder.pos_embed`` resampled to ``grid`` (ALBEF's bicubic rule), the rest unchanged."""
    key = "visual_encoder.pos_embed"
    return {**state, key: interpolate_pos_embed(state[key], grid)} if key in state else state


def read_bert_config(text_dir: Path) -> BertConfig:
    """``BertConfig`` from ALBEF's ``config_bert.json`` in the tokenizer directory."""
    path = Path(text_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{text_dir} has no {CONFIG_FILE}: copy ALBEF's configs/config_bert.json (BERT sizes plus "
                        "fusion_layer and encoder_width) next to the tokenizer's vocab.txt")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}): restore ALBEF's config_bert.json") from None
    missing = [name for name in _BERT_FIELDS if name not in fields]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: use ALBEF's config_bert.json, which has every BERT size "
                        "plus fusion_layer and encoder_width")
    if fields.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{path} sets hidden_act={fields['hidden_act']!r}; ALBEF's encoder uses 'gelu'")
    return BertConfig(**{name: fields[name] for name in _BERT_FIELDS}, pad_token_id=int(fields.get("pad_token_id", 0)))


def bare_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A robust encoder file's ViT keys in the bare layout (a ``visual_encoder.`` prefix is stripped)."""
    prefix = "visual_encoder."
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def export_visual_encoder(vision: torch.nn.Module, path: str | Path) -> Path:
    """Write ``vision``'s ViT weights as a bare ``visual_encoder.state_dict()`` (MAVA/SGA's layout).

    ``.pth``/``.pt`` are written with ``torch.save`` of a plain dict of tensors (what MAVA's
    scripts save and load), ``.safetensors`` with safetensors.

    Raises:
        UserError: an unknown suffix, or a vision tower with a trained ``vision_proj``
            (the bare layout has no place for it; MAVA trains only the ViT).
    """
    path = Path(path).expanduser().resolve()
    state = {key: value.detach().contiguous().cpu() for key, value in vision.state_dict().items()}
    if any(key.startswith("vision_proj.") for key in state):
        raise UserError("this vision tower trains vision_proj, which MAVA's bare visual_encoder layout cannot hold: "
                        "export from a run with the projection frozen (the default)")
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix in (".pth", ".pt"):
        torch.save(state, path)
    else:
        raise UserError(f"cannot export to {path.name}: use a .pth (MAVA/SGA scripts) or .safetensors file name")
    return path
