"""Fake ALBEF/TCL files at tiny sizes, written from the official key list (not from the platform's modules).

The key patterns and shapes are transcribed from ALBEF-TCL-NOTES §1.1-1.3 and §7.3
(``salesforce/ALBEF:models/{model_retrieval,model_pretrain,model_ve,vit,xbert}.py``), so a
layout mistake in ``trainables/models/albef*.py`` makes the strict load fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainables.data.synthetic import describe, sample_scenes
from trainables.models.albef_text import pre_caption

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Tiny sizes: ViT 32 px, patch 8 (4x4 grid), width 32, depth 2; BERT width 24 (!= 32: encoder_width
# is exercised), 1 text layer + 1 fusion layer, 2 heads; ITC dim 16; queues of 8.
IMAGE, PATCH, VIT_WIDTH, VIT_DEPTH = 32, 8, 32, 2
HIDDEN, HEADS, INTERMEDIATE, LAYERS, FUSION_LAYER, MAX_POSITIONS = 24, 2, 48, 2, 1, 40
EMBED_DIM, QUEUE = 16, 8


def world_words() -> list[str]:
    """Every word of the synthetic world's captions after ``pre_caption`` (sorted)."""
    words = {word for scene in sample_scenes("train", 400, 0) for caption in describe(scene) for word in pre_caption(caption).split()}
    return sorted(words)


def write_text_dir(directory: Path) -> Path:
    """``vocab.txt`` (specials + the world's words) and ALBEF's ``config_bert.json`` at tiny sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL_TOKENS + world_words()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": HIDDEN, "initializer_range": 0.02,
              "intermediate_size": INTERMEDIATE, "layer_norm_eps": 1e-12, "max_position_embeddings": MAX_POSITIONS,
              "model_type": "bert", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0,
              "type_vocab_size": 2, "vocab_size": len(vocab), "fusion_layer": FUSION_LAYER, "encoder_width": VIT_WIDTH}
    (directory / "config_bert.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def vit_shapes(grid: int = IMAGE // PATCH) -> dict[str, tuple[int, ...]]:
    w = VIT_WIDTH
    shapes = {"cls_token": (1, 1, w), "pos_embed": (1, 1 + grid * grid, w), "patch_embed.proj.weight": (w, 3, PATCH, PATCH),
              "patch_embed.proj.bias": (w,), "norm.weight": (w,), "norm.bias": (w,)}
    for i in range(VIT_DEPTH):
        for name, shape in (("norm1.weight", (w,)), ("norm1.bias", (w,)), ("attn.qkv.weight", (3 * w, w)), ("attn.qkv.bias", (3 * w,)),
                            ("attn.proj.weight", (w, w)), ("attn.proj.bias", (w,)), ("norm2.weight", (w,)), ("norm2.bias", (w,)),
                            ("mlp.fc1.weight", (4 * w, w)), ("mlp.fc1.bias", (4 * w,)), ("mlp.fc2.weight", (w, 4 * w)), ("mlp.fc2.bias", (w,))):
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def bert_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    h = HIDDEN
    shapes = {"embeddings.word_embeddings.weight": (vocab_size, h), "embeddings.position_embeddings.weight": (MAX_POSITIONS, h),
              "embeddings.token_type_embeddings.weight": (2, h), "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(LAYERS):
        blocks = [("attention", h)] + ([("crossattention", VIT_WIDTH)] if i >= FUSION_LAYER else [])
        for block, source in blocks:
            for proj, width in (("query", h), ("key", source), ("value", source)):
                shapes[f"encoder.layer.{i}.{block}.self.{proj}.weight"] = (h, width)
                shapes[f"encoder.layer.{i}.{block}.self.{proj}.bias"] = (h,)
            shapes[f"encoder.layer.{i}.{block}.output.dense.weight"] = (h, h)
            for name in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
                shapes[f"encoder.layer.{i}.{block}.{name}"] = (h,)
        shapes[f"encoder.layer.{i}.intermediate.dense.weight"] = (INTERMEDIATE, h)
        shapes[f"encoder.layer.{i}.intermediate.dense.bias"] = (INTERMEDIATE,)
        shapes[f"encoder.layer.{i}.output.dense.weight"] = (h, INTERMEDIATE)
        for name in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
            shapes[f"encoder.layer.{i}.{name}"] = (h,)
    return shapes


def _random(shapes: dict[str, tuple[int, ...]], prefix: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for key, shape in shapes.items():
        if key.endswith("LayerNorm.weight") or key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            state[prefix + key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[prefix + key] = 0.2 * torch.randn(shape, generator=generator)
    return state


def albef_state(vocab_size: int, variant: str = "retrieval", seed: int = 0, grid: int = IMAGE // PATCH) -> dict[str, torch.Tensor]:
    """A random state dict in ALBEF's layout: ``retrieval`` (fine-tuned), ``pretrain`` (``bert.`` + MLM head) or ``ve``."""
    g = torch.Generator().manual_seed(seed)
    bert_prefix = "text_encoder.bert." if variant == "pretrain" else "text_encoder."
    state = {**_random(vit_shapes(grid), "visual_encoder.", g), **_random(bert_shapes(vocab_size), bert_prefix, g)}
    state[bert_prefix + "embeddings.position_ids"] = torch.arange(MAX_POSITIONS).unsqueeze(0)
    # momentum copies (training only)
    state.update({k.replace("visual_encoder.", "visual_encoder_m.", 1): v.clone() for k, v in list(state.items()) if k.startswith("visual_encoder.")})
    state.update({k.replace("text_encoder", "text_encoder_m", 1): v.clone() for k, v in list(state.items()) if k.startswith("text_encoder.")})
    if variant == "ve":
        for prefix in ("cls_head.", "cls_head_m."):
            state.update(_random({"0.weight": (HIDDEN, HIDDEN), "0.bias": (HIDDEN,), "2.weight": (3, HIDDEN), "2.bias": (3,)}, prefix, g))
        return state
    for prefix in ("", "_m"):
        state.update(_random({f"vision_proj{prefix}.weight": (EMBED_DIM, VIT_WIDTH), f"vision_proj{prefix}.bias": (EMBED_DIM,),
                              f"text_proj{prefix}.weight": (EMBED_DIM, HIDDEN), f"text_proj{prefix}.bias": (EMBED_DIM,)}, "", g))
    state.update(_random({"itm_head.weight": (2, HIDDEN), "itm_head.bias": (2,)}, "", g))
    state["temp"] = torch.tensor(0.07)
    state["image_queue"] = torch.randn(EMBED_DIM, QUEUE, generator=g)
    state["text_queue"] = torch.randn(EMBED_DIM, QUEUE, generator=g)
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if variant == "pretrain":  # BertForMaskedLM's MLM head; model_pretrain.py has no idx_queue
        for prefix in ("text_encoder.cls.predictions.", "text_encoder_m.cls.predictions."):
            state.update(_random({"bias": (vocab_size,), "transform.dense.weight": (HIDDEN, HIDDEN), "transform.dense.bias": (HIDDEN,),
                                  "transform.LayerNorm.weight": (HIDDEN,), "transform.LayerNorm.bias": (HIDDEN,),
                                  "decoder.weight": (vocab_size, HIDDEN), "decoder.bias": (vocab_size,)}, prefix, g))
    else:
        state["idx_queue"] = torch.full((1, QUEUE), -100, dtype=torch.long)
    return state


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], wrapped: bool = True) -> Path:
    """ALBEF's ``torch.save({'model': ..., 'optimizer': ..., 'config': ..., 'epoch': ...})`` (or a bare state dict)."""
    content = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
               "lr_scheduler": {"t_initial": 10, "warmup_lr_init": 1e-5, "base_values": [1e-5]},
               "config": {"image_res": IMAGE, "k_test": 128, "embed_dim": EMBED_DIM, "text_encoder": "bert-base-uncased"},
               "epoch": 0} if wrapped else state
    torch.save(content, path)
    return path


def write_tiny_albef(directory: Path, variant: str = "retrieval", seed: int = 0) -> tuple[Path, Path]:
    """(text dir, checkpoint) of a random tiny ALBEF written under ``directory``."""
    text_dir = write_text_dir(directory / "bert")
    vocab_size = len((text_dir / "vocab.txt").read_text(encoding="utf-8").split())
    checkpoint = write_checkpoint(directory / f"albef-{variant}.pth", albef_state(vocab_size, variant, seed))
    return text_dir, checkpoint


def write_tiny_albef_ve_spec(directory: Path) -> str:
    """``albef:TEXT_DIR@CHECKPOINT`` of a random tiny VE model whose text width equals its ViT width, as ALBEF's
    768/768 (Co-attack and SGA compare the two [CLS] features)."""
    global HIDDEN
    saved, HIDDEN = HIDDEN, VIT_WIDTH
    try:
        text_dir, checkpoint = write_tiny_albef(directory, variant="ve")
    finally:
        HIDDEN = saved
    return f"albef:{text_dir}@{checkpoint}"


def write_shifted_encoder(spec: str, path: Path, seed: int) -> Path:
    """A 'fine-tuned' vision encoder of ``spec``'s model: its ViT with perturbed weights, saved as a training
    checkpoint stores it (``vision.safetensors`` at ``path``)."""
    from safetensors.torch import save_file

    from trainables.models import load_model

    generator = torch.Generator().manual_seed(seed)
    state = {k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous() for k, v in load_model(spec).vision.state_dict().items()}
    save_file(state, str(path))
    return path
