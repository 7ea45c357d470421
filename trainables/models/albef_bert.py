"""ALBEF's text and fusion encoder (``models/xbert.py:BertModel(add_pooling_layer=False)``), key names kept.

Layers ``0 .. fusion_layer-1`` are plain BERT layers (the text encoder); layers
``fusion_layer ..`` add a ``crossattention`` block between self-attention and the
feed-forward part, whose key/value projections read ``encoder_width``-wide image tokens
(the fusion encoder). ``text`` runs the first part from token ids, ``fusion`` the second
on the text part's output, as ALBEF's ``mode='text'`` and ``mode='fusion'``.

transformers' ``BertLayer`` cannot express this (cross-attention in every layer or
none, only for causal decoders, no ``encoder_width``; ALBEF-TCL-NOTES §6), so the module
is written here; tests check it against transformers' ``BertModel`` on the text layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ALBEF's BertModel.get_extended_attention_mask: masked positions get -10000, not -inf.
MASKED_SCORE = -10000.0


@dataclass(frozen=True)
class BertConfig:
    """The fields of ALBEF's ``config_bert.json`` the encoder needs (bert-base-uncased + ALBEF's two)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    fusion_layer: int = 6  # layers from here on attend to the image
    encoder_width: int = 768  # width of the image tokens cross-attention reads


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Token type ids are always zeros in ALBEF: row 0 is added to every token.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Scaled dot-product attention; keys/values read ``source_width`` inputs (image tokens for cross-attention)."""

    def __init__(self, config: BertConfig, source_width: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(source_width, config.hidden_size)
        self.value = nn.Linear(source_width, config.hidden_size)
        # ALBEF's save_attention flag: keep the attention probabilities (in the autograd graph) of the
        # next forward pass, for GradCAM (AlbefVLP.itm_cross_attention); off otherwise.
        self.save_attention = False
        self.saved_attention: torch.Tensor | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        return x.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, source: torch.Tensor, score_bias: torch.Tensor | None,
                source_index: torch.Tensor | None = None) -> torch.Tensor:
        query, key, value = self._split(self.query(hidden)), self._split(self.key(source)), self._split(self.value(source))
        if source_index is not None:  # row p reads source[source_index[p]]: keys/values projected once per distinct source
            key, value = key[source_index], value[source_index]
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
        if score_bias is not None:
            scores = scores + score_bias
        probabilities = scores.softmax(dim=-1)
        if self.save_attention:
            self.saved_attention = probabilities
        context = probabilities @ value
        return context.transpose(1, 2).reshape(hidden.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, source_width: int):
        super().__init__()
        self.self = BertSelfAttention(config, source_width)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, source: torch.Tensor, score_bias: torch.Tensor | None,
                source_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(hidden, source, score_bias, source_index), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # BERT's "gelu" is the exact (erf) form


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertLayer(nn.Module):
    """Self-attention, then (fusion layers only) cross-attention to the image, then the feed-forward part."""

    def __init__(self, config: BertConfig, cross_attention: bool):
        super().__init__()
        self.attention = BertAttention(config, config.hidden_size)
        self.crossattention = BertAttention(config, config.encoder_width) if cross_attention else None
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, text_bias: torch.Tensor, image: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.attention(hidden, hidden, text_bias)
        if self.crossattention is not None:
            # ALBEF's image mask is all ones: no bias on image positions.
            hidden = self.crossattention(hidden, image, None, image_index)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, i >= config.fusion_layer) for i in range(config.num_hidden_layers)])


class AlbefBert(nn.Module):
    """ALBEF's ``text_encoder``: ``text`` (layers < fusion_layer) and ``fusion`` (the rest, with the image)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        if not 0 < config.fusion_layer < config.num_hidden_layers:
            raise ValueError(f"fusion_layer {config.fusion_layer} must lie in 1..{config.num_hidden_layers - 1}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @staticmethod
    def _bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * MASKED_SCORE)

    def text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L, hidden): the unimodal text encoder (ALBEF's ``mode='text'``)."""
        hidden = self.embeddings(input_ids)
        bias = self._bias(attention_mask, hidden.dtype)
        for layer in self.encoder.layer[: self.config.fusion_layer]:
            hidden = layer(hidden, bias)
        return hidden

    def fusion(self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
               image_index: torch.Tensor | None = None) -> torch.Tensor:
        """(P, L, hidden): the fusion layers on ``text`` output with image tokens (ALBEF's ``mode='fusion'``).

        ``image_index`` (P,), optional: text row p attends to ``image_tokens[image_index[p]]``, so
        image tokens shared by several pairs are projected to keys/values once (re-ranking).
        """
        bias = self._bias(attention_mask, text_hidden.dtype)
        hidden = text_hidden
        for layer in self.encoder.layer[self.config.fusion_layer:]:
            hidden = layer(hidden, bias, image_tokens, image_index)
        return hidden
