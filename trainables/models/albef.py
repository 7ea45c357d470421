"""ALBEF and TCL (fusion-encoder VLP models) behind the platform interface: ``albef:DIR@FILE``, ``tcl:DIR@FILE``.

``DIR`` holds bert-base-uncased's ``vocab.txt`` and ALBEF's ``config_bert.json``; ``FILE`` is
a released or fine-tuned checkpoint (``.pth`` read with ``weights_only=True``, or
``.safetensors``). The ViT's sizes come from the checkpoint's shapes, the BERT's from
``config_bert.json``; which heads the file has decides what the model can do:

* ``itm`` (``vision_proj``, ``text_proj``, ``itm_head``, ``temp``): retrieval. F(v) =
  ``vision_proj(ViT CLS)`` (SGA's ``image_feat`` before normalisation), the text feature
  ``text_proj(text CLS)``; ``itm_pair_logits`` runs the fusion layers for ALBEF's
  re-ranking, which scores the ITC top-k_test by the ITM logit **alone**
  (``itm_scoring = "itm"``; BLIP adds the ITC similarity).
* ``cls`` (``cls_head``): visual entailment. F(v) = the raw ViT CLS, the text feature the
  raw text CLS (as MAVA's and Co-attack's VE scripts); ``entailment_logits`` gives the 3 classes.

Only the ViT is trained (MAVA's ALBEF script trains ``visual_encoder`` alone): ``vision_proj``
is applied inside ``vision`` but stays outside its parameters unless ``train_projection``,
so ``vision``'s weights are exactly MAVA's bare ``visual_encoder`` layout. TCL shares the
architecture and checkpoint layout (ALBEF-TCL-NOTES §2); only its ``family`` differs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from trainables.errors import UserError
from trainables.models.albef_bert import AlbefBert, BertConfig
from trainables.models.albef_checkpoint import fit_pos_embed, heads_of, inference_state, read_bert_config, vit_config
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer
from trainables.models.albef_vit import AlbefViT, VitConfig
from trainables.models.base import VisionTower, VLPModel
from trainables.models.weights import load_strict, read_state_dict

# ALBEF's test transform normalises with CLIP's statistics (dataset/__init__.py).
ALBEF_MEAN = (0.48145466, 0.4578275, 0.40821073)
ALBEF_STD = (0.26862954, 0.26130258, 0.27577711)
FINETUNE_IMAGE_SIZE = 384  # image_res of ALBEF's retrieval/VE/grounding configs; pre-training files are resampled to it
ITM_PAIR_BATCH = 128  # image-text pairs per fusion forward pass
ENTAILMENT_CLASSES = ("contradiction", "neutral", "entailment")  # ALBEF's VE labels 0, 1, 2


class _Shared:
    """A reference to a module that is not registered as a submodule (so it is no parameter of the holder).

    ``copy.deepcopy`` of a whole model copies it through the shared memo, so the copy's
    towers point at the copy's own registered ``vision_proj``.
    """

    def __init__(self, module: nn.Module):
        self.module = module


class AlbefVision(AlbefViT, VisionTower):
    """ALBEF's ViT (keys exactly ``visual_encoder.*``); ``forward`` gives F(v), ``tokens`` every token."""

    def __init__(self, config: VitConfig):
        super().__init__(config)
        self._frozen_projection: _Shared | None = None

    def attach_projection(self, projection: nn.Module, trainable: bool) -> None:
        """Apply ``projection`` to the CLS token; a frozen one is shared (not a parameter of this tower)."""
        if trainable:
            self.vision_proj = copy.deepcopy(projection).requires_grad_(True)
        else:
            self._frozen_projection = _Shared(projection)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 + grid**2, width): the ViT's output tokens for normalised pixels (what the fusion layers read)."""
        return AlbefViT.forward(self, pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cls = self.tokens(pixels)[:, 0]
        if "vision_proj" in self._modules:
            return self.vision_proj(cls)
        return cls if self._frozen_projection is None else self._frozen_projection.module(cls)


class AlbefNet(nn.Module):
    """The checkpoint's module tree with ALBEF's key names; heads only where the checkpoint has them."""

    def __init__(self, vit: VitConfig, bert: BertConfig, heads: frozenset[str], embed_dim: int = 256):
        super().__init__()
        self.visual_encoder = AlbefVision(vit)
        self.text_encoder = AlbefBert(bert)
        if "itm" in heads:
            self.vision_proj = nn.Linear(vit.width, embed_dim)
            self.text_proj = nn.Linear(bert.hidden_size, embed_dim)
            self.itm_head = nn.Linear(bert.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
        if "cls" in heads:
            self.cls_head = nn.Sequential(nn.Linear(bert.hidden_size, bert.hidden_size), nn.ReLU(),
                                          nn.Linear(bert.hidden_size, len(ENTAILMENT_CLASSES)))


class AlbefVLP(VLPModel):
    """An ALBEF model (retrieval and/or entailment heads) behind the one interface; see the module docstring."""

    family = "albef"
    has_text_encoder = True
    itm_scoring = "itm"  # re-ranking score of the ITC top-k_test: the ITM logit alone (Retrieval.py:evaluation)

    def __init__(self, net: AlbefNet, tokenizer: AlbefTokenizer, spec: str, train_projection: bool = False):
        self.heads = frozenset(h for h, module in (("itm", "itm_head"), ("cls", "cls_head")) if hasattr(net, module))
        vision = net.visual_encoder
        if "itm" in self.heads:
            vision.attach_projection(net.vision_proj, trainable=train_projection)
        super().__init__(vision=vision, image_size=vision.config.image_size, mean=ALBEF_MEAN, std=ALBEF_STD)
        self.train_projection = train_projection
        self.text_encoder = net.text_encoder
        if "itm" in self.heads:
            if not train_projection:
                self.vision_proj = net.vision_proj  # registered here, so .to(device) moves it and freeze_text freezes it
                # F and F_org share this one frozen projection (the deepcopy in VLPModel made F_org its own).
                self.vision_original.attach_projection(self.vision_proj, trainable=False)
            self.text_proj, self.itm_head, self.temp = net.text_proj, net.itm_head, net.temp
        if "cls" in self.heads:
            self.cls_head = net.cls_head
        self.tokenizer = tokenizer
        self.spec = spec
        self.freeze_text()

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), device=self.pixel_mean.device)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(T, D) text features: ``text_proj`` of the text-layer CLS (retrieval), or that CLS itself (entailment)."""
        tokens = self._tokens(texts)
        cls = self.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])[:, 0]
        return self.text_proj(cls) if "itm" in self.heads else cls

    def _need(self, head: str, use: str) -> None:
        if head not in self.heads:
            present = ", ".join(sorted(self.heads))
            raise UserError(f"{self.spec} has no {'itm_head' if head == 'itm' else 'cls_head'} (its heads: {present}), "
                            f"so it cannot {use}: give a {'retrieval' if head == 'itm' else 'visual-entailment'} checkpoint")

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, width) tokens of the trainable ViT for [0, 1] pixels (what the fusion layers attend to)."""
        return self.vision.tokens(self.normalize(pixels))

    def _fusion_cls(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        tokens = self._tokens(texts)
        text = self.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])
        return self.text_encoder.fusion(text, tokens["attention_mask"], image_tokens)[:, 0]

    def itm_logits(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(P, 2) ITM logits ``itm_head(fusion CLS)`` (no match, match) of pairs (image_tokens[p], texts[p])."""
        self._need("itm", "score image-text matching")
        if image_tokens.shape[0] != len(texts):
            raise ValueError(f"{image_tokens.shape[0]} images but {len(texts)} texts: ITM scores pairs")
        logits = [self.itm_head(self._fusion_cls(image_tokens[start:start + ITM_PAIR_BATCH], texts[start:start + ITM_PAIR_BATCH]))
                  for start in range(0, len(texts), ITM_PAIR_BATCH)]
        return torch.cat(logits) if logits else image_tokens.new_zeros(0, 2)

    def itm_pair_logits(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(P,) raw ITM "match" logits ``itm_head(fusion CLS)[:, 1]`` of pairs (image_tokens[p], texts[p])."""
        return self.itm_logits(image_tokens, texts)[:, 1]

    def itm_text_states(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Each text's text-layer output once (ALBEF's evaluation caches ``text_embeds`` likewise): ``hidden`` (T, L, h), ``mask``."""
        self._need("itm", "score image-text matching")
        tokens = self._tokens(texts)
        return {"hidden": self.text_encoder.text(tokens["input_ids"], tokens["attention_mask"]), "mask": tokens["attention_mask"]}

    def itm_cached_logits(self, image_tokens: torch.Tensor, text_states: dict[str, torch.Tensor], text_index: torch.Tensor,
                          image_index: torch.Tensor) -> torch.Tensor:
        """(P,) ITM match logits of pairs (image_tokens[image_index[p]], text text_index[p] of ``itm_text_states``).

        The same logits as ``itm_pair_logits``; only the fusion layers run per pair, and each
        distinct image's keys/values are projected once.
        """
        mask = text_states["mask"][text_index]
        length = int(mask.sum(dim=1).max())  # drop the columns that are padding in every pair (masked anyway)
        hidden = text_states["hidden"][text_index, :length]
        return self.itm_head(self.text_encoder.fusion(hidden, mask[:, :length], image_tokens, image_index)[:, 0])[:, 1]

    def itm_scores(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B_img, B_txt) ITM match logits of every image with every text ([0, 1] pixels)."""
        tokens = self.image_tokens(pixels)
        num_images, num_texts = tokens.shape[0], len(texts)
        pairs = self.itm_pair_logits(tokens.repeat_interleave(num_texts, dim=0), list(texts) * num_images)
        return pairs.view(num_images, num_texts)

    @property
    def gradcam_layer(self) -> int:
        """ALBEF's GradCAM layer: the third of six fusion layers (``--block_num 8`` of 12), scaled to this model's depth."""
        config = self.text_encoder.config
        return config.fusion_layer + (config.num_hidden_layers - config.fusion_layer) // 3

    def itm_cross_attention(self, pixels: torch.Tensor, texts: list[str],
                            layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM match logits (B,) of pairs (pixels[b], texts[b]) with one fusion layer's cross-attention probabilities.

        Returns ``(logits, attention (B, heads, L, 1 + patches), text mask (B, L))``; the attention
        is in the logits' autograd graph through image tokens detached from the ViT and made to
        require grad, so ``torch.autograd.grad(logits.sum(), attention)`` works with frozen weights
        and never reaches a parameter. ``layer``: absolute index of a fusion layer (None: :attr:`gradcam_layer`).
        """
        self._need("itm", "ground expressions (GradCAM of the ITM logit)")
        return self._cross_attention(pixels, list(texts), layer, lambda fused: self.itm_head(fused)[:, 1])

    def entailment_cross_attention(self, pixels: torch.Tensor, hypotheses: list[str], labels: torch.Tensor,
                                   layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`itm_cross_attention`, for the VE head: the logit of class ``labels[b]`` of pair b
        (the paper's Figure 5 draws GradCAM of the VE model)."""
        self._need("cls", "draw GradCAM of visual entailment")
        labels = labels.to(pixels.device).view(-1, 1)
        return self._cross_attention(pixels, list(hypotheses), layer, lambda fused: self.cls_head(fused).gather(1, labels)[:, 0])

    def _cross_attention(self, pixels: torch.Tensor, texts: list[str], layer: int | None,
                         score) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(score(fusion CLS) (B,), attention of fusion layer ``layer``, text mask)``; see :meth:`itm_cross_attention`."""
        config = self.text_encoder.config
        layer = self.gradcam_layer if layer is None else layer
        if not config.fusion_layer <= layer < config.num_hidden_layers:
            raise UserError(f"GradCAM layer {layer} is not a fusion layer of {self.spec}: "
                            f"choose one of {config.fusion_layer}..{config.num_hidden_layers - 1}")
        cross = self.text_encoder.encoder.layer[layer].crossattention.self
        with torch.enable_grad():
            image = self.image_tokens(pixels).detach().requires_grad_(True)
            tokens = self._tokens(texts)
            cross.save_attention = True
            try:
                text = self.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])
                fused = self.text_encoder.fusion(text, tokens["attention_mask"], image)
                attention = cross.saved_attention
            finally:
                cross.save_attention, cross.saved_attention = False, None
            scores = score(fused[:, 0])
        return scores, attention, tokens["attention_mask"]

    def entailment_logits(self, pixels: torch.Tensor, hypotheses: list[str]) -> torch.Tensor:
        """(B, 3) logits over ``ENTAILMENT_CLASSES`` of (premise image, hypothesis) pairs (``model_ve.py``)."""
        self._need("cls", "predict visual entailment")
        return self.cls_head(self._fusion_cls(self.image_tokens(pixels), list(hypotheses)))

    @property
    def logit_scale(self) -> float:
        # ALBEF's ITC logits are sim / temp; entailment checkpoints have no temperature.
        return float(1.0 / self.temp.detach().clamp(min=1e-3)) if "itm" in self.heads else 100.0


class TclVLP(AlbefVLP):
    """TCL: ALBEF's architecture and checkpoint layout, trained with TCL's objectives."""

    family = "tcl"


FAMILIES: dict[str, type[AlbefVLP]] = {"albef": AlbefVLP, "tcl": TclVLP}


def build_albef(state: dict[str, torch.Tensor], bert: BertConfig, source: str,
                image_size: int | None = None) -> AlbefNet:
    """An ``AlbefNet`` sized from ``state`` (already through ``inference_state``) with its weights loaded strictly."""
    heads = heads_of(state, source)
    vit = vit_config(state, source, image_size)
    state = fit_pos_embed(state, vit.grid)
    embed_dim = state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256
    net = AlbefNet(vit, bert, heads, embed_dim)
    load_strict(net, state, source=source)
    return net


def load_albef(text_dir: Path, checkpoint: str | Path, spec: str, family: str = "albef",
               image_size: int | None = None, train_projection: bool = False) -> AlbefVLP:
    """ALBEF/TCL from a tokenizer directory and a checkpoint, in eval mode, text side frozen.

    Args:
        image_size: the model's resolution; None keeps the checkpoint's own grid, except
            for pre-training files (``text_encoder.bert.*``), which ALBEF fine-tunes at 384 px.
        train_projection: make ``vision_proj`` part of the trainable ``vision`` (MAVA keeps it frozen).
    """
    raw = read_state_dict(checkpoint)
    if image_size is None and any(key.startswith("text_encoder.bert.") for key in raw):
        image_size = FINETUNE_IMAGE_SIZE
    net = build_albef(inference_state(raw), read_bert_config(Path(text_dir)), str(checkpoint), image_size)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(Path(text_dir)))
    return FAMILIES[family](net, tokenizer, spec, train_projection=train_projection).eval()
