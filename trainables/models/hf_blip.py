"""BLIP from a local Hugging Face directory: retrieval (``hf-blip-itr:``) and captioning (``hf-blip-cap:``).

``hf-blip-itr:/dir`` — ``BlipForImageTextRetrieval`` (e.g. a copy of
``Salesforce/blip-itm-base-coco``). ``vision`` = ViT + ``vision_proj`` on the CLS
token: the ITC embedding that BLIP's contrastive retrieval uses. ``encode_text`` is
the text encoder run unimodally (no image) with its CLS token through ``text_proj``.
``itm_scores`` runs the ITM head over the *trainable* ViT's tokens, for BLIP's
re-ranking of the contrastive top-k (``trainables.evaluation.rerank``).
``logit_scale`` (TeCoA, ``apgd-ce``, VLP-attack) is BLIP's ITC ``1 / temp`` from the
folder: transformers' retrieval class has no temperature parameter, so a ``temp``
entry of the weight file (BLIP's own ``BLIP_Retrieval`` name) is read directly, and
without one the folder's ``config.json`` ``logit_scale_init_value`` (``ln(1/temp)``;
ln(1/0.07) unless the config says otherwise) gives it (``checkpoint_logit_scale``).

``hf-blip-cap:/dir`` — ``BlipForConditionalGeneration`` (e.g. a copy of
``Salesforce/blip-image-captioning-base``). It has no text encoder, so it fine-tunes
with the paper's Eq. 8 (``b*L_VSSE + c*L_SCA``, a = 0); ``vision`` returns the ViT's
CLS token as F(v), and ``generate_captions`` decodes from the trainable ViT's tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from trainables.errors import UserError
from trainables.models.base import VisionTower, VLPModel
from trainables.models.hf_clip import image_statistics, load_pretrained, load_tokenizer, read_model_config
from trainables.tasks import Task

if TYPE_CHECKING:  # transformers' model classes cost ~0.75 s to import: only the loaders that need them import them
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, PreTrainedTokenizerBase

# BLIP's retrieval configs truncate captions to 35 tokens (max_length in BLIP's tokenizer calls).
TEXT_MAX_TOKENS = 35
# The prompt of BLIP's captioning evaluation (configs/caption_coco.yaml), stripped from the output.
CAPTION_PROMPT = "a picture of "
ITM_PAIR_BATCH = 128  # image-text pairs per ITM forward pass
TEMP_KEY = "temp"  # BLIP's ITC temperature parameter (models/blip_retrieval.py), clamped to [0.001, 0.5] there
TEMP_RANGE = (0.001, 0.5)


class BlipVision(VisionTower):
    """BLIP's ViT; ``forward`` gives one feature per image, ``tokens`` every output token.

    Args:
        vision_model: ``BlipVisionModel``.
        projection: applied to the CLS token (``vision_proj`` for retrieval), or None to
            return the CLS token itself (captioning: the feature F(v) of Eq. 8).
    """

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, width): the ViT's layer-normed output tokens for normalised pixels."""
        return self.vision_model(pixel_values=pixels).last_hidden_state

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # last_hidden_state[:, 0], not pooler_output: transformers layer-norms the pooled CLS a
        # second time, while BLIP's own code (and vision_proj) uses the singly normed CLS.
        cls = self.tokens(pixels)[:, 0]
        return cls if self.projection is None else self.projection(cls)


class BlipRetrievalVLP(VLPModel):
    """``BlipForImageTextRetrieval`` behind the platform interface (ITC features, ITM re-scoring)."""

    family = "blip"
    has_text_encoder = True
    itm_scoring = "itc+itm"  # BLIP's train_retrieval.py: ITC cosine + ITM match logit on the top-k_test
    heads = frozenset({"itm"})  # transformers' retrieval class always has its ITM head (GradCAM asks)

    def __init__(self, blip: BlipForImageTextRetrieval, tokenizer: PreTrainedTokenizerBase, mean, std, spec: str,
                 logit_scale: float = 100.0):
        vision = BlipVision(blip.vision_model, blip.vision_proj)
        super().__init__(vision=vision, image_size=int(blip.config.vision_config.image_size), mean=mean, std=std)
        self.text_encoder = blip.text_encoder
        self.text_proj = blip.text_proj
        self.itm_head = blip.itm_head
        self.tokenizer = tokenizer
        # BLIP's ITM code puts [ENC] in place of [CLS]; transformers' forward keeps [CLS]
        # (its tokenizer may not know [ENC]). Follow BLIP whenever the vocabulary has it.
        vocabulary = tokenizer.get_vocab()
        self.itm_first_token = vocabulary["[ENC]"] if "[ENC]" in vocabulary else None
        self.spec = spec
        self._logit_scale = float(logit_scale)
        self.freeze_text()

    @property
    def logit_scale(self) -> float:
        """BLIP's ITC ``1 / temp`` as the checkpoint folder gives it (``checkpoint_logit_scale``)."""
        return self._logit_scale

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        return {key: tokens[key].to(self.pixel_mean.device) for key in ("input_ids", "attention_mask")}

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Unimodal text features (T, D): the text encoder without image, CLS -> ``text_proj``."""
        tokens = self._tokenize(texts)
        output = self.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return self.text_proj(output.last_hidden_state[:, 0])

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 + patches, width) tokens of the trainable ViT for [0, 1] pixels (what ITM attends to)."""
        return self.vision.tokens(self.normalize(pixels))

    def itm_pair_logits(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(P,) ITM "match" logits of pairs (image_tokens[p], texts[p]).

        BLIP's retrieval evaluation adds this raw logit (``itm_head(...)[:, 1]``, no
        softmax) to the contrastive similarity of its top-k candidates.
        """
        if image_tokens.shape[0] != len(texts):
            raise ValueError(f"{image_tokens.shape[0]} images but {len(texts)} texts: ITM scores pairs")
        logits = []
        for start in range(0, len(texts), ITM_PAIR_BATCH):
            logits.append(self._itm_forward(image_tokens[start:start + ITM_PAIR_BATCH], texts[start:start + ITM_PAIR_BATCH])[0])
        return torch.cat(logits)

    def _itm_forward(self, images: torch.Tensor, texts: list[str], output_attentions: bool = False):
        """(ITM match logits, every layer's cross-attention or None, text mask) of pairs (images[p], texts[p])."""
        tokens = self._tokenize(texts)
        input_ids = tokens["input_ids"].clone()
        if self.itm_first_token is not None:
            input_ids[:, 0] = self.itm_first_token
        output = self.text_encoder(
            input_ids=input_ids,
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=images,
            encoder_attention_mask=torch.ones(images.shape[:-1], dtype=torch.long, device=images.device),
            output_attentions=output_attentions,
        )
        return self.itm_head(output.last_hidden_state[:, 0])[:, 1], output.cross_attentions, tokens["attention_mask"]

    @property
    def gradcam_layer(self) -> int:
        """Layer 8 of BLIP's 12 (where BLIP's GradCAM demo reads cross-attention), scaled to this model's depth."""
        return (2 * self.text_encoder.config.num_hidden_layers) // 3

    def itm_cross_attention(self, pixels: torch.Tensor, texts: list[str],
                            layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM match logits (B,) of pairs (pixels[b], texts[b]) with one layer's cross-attention probabilities.

        The same contract as ALBEF's (``AlbefVLP.itm_cross_attention``): ``(logits, attention
        (B, heads, L, 1 + patches), text mask (B, L))``, the attention in the logits' graph through
        image tokens detached from the ViT, so GradCAM's ``torch.autograd.grad`` never reaches a
        parameter. Every BLIP text layer cross-attends to the image; ``layer`` picks one (None:
        :attr:`gradcam_layer`).
        """
        layers = self.text_encoder.config.num_hidden_layers
        layer = self.gradcam_layer if layer is None else layer
        if not 0 <= layer < layers:
            raise UserError(f"GradCAM layer {layer} is not a layer of {self.spec}'s text encoder: choose one of 0..{layers - 1}")
        with torch.enable_grad():
            images = self.image_tokens(pixels).detach().requires_grad_(True)
            logits, attentions, mask = self._itm_forward(images, list(texts), output_attentions=True)
        return logits, attentions[layer], mask

    def itm_scores(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B_img, B_txt) ITM match logits of every image with every text ([0, 1] pixels)."""
        tokens = self.image_tokens(pixels)
        num_images, num_texts = tokens.shape[0], len(texts)
        pairs = self.itm_pair_logits(tokens.repeat_interleave(num_texts, dim=0), list(texts) * num_images)
        return pairs.view(num_images, num_texts)


class BlipCaptionVLP(VLPModel):
    """``BlipForConditionalGeneration``: a captioner; ``vision`` gives the ViT's CLS token as F(v)."""

    family = "blip"
    tasks = (Task.CAPTIONING,)
    has_text_encoder = False

    def __init__(self, blip: BlipForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, mean, std, spec: str):
        vision = BlipVision(blip.vision_model, projection=None)
        super().__init__(vision=vision, image_size=int(blip.config.vision_config.image_size), mean=mean, std=std)
        self.text_decoder = blip.text_decoder
        self.tokenizer = tokenizer
        text_config = blip.config.text_config
        self.bos_token_id = int(text_config.bos_token_id)
        # BLIP ends a caption at [SEP]; transformers' BLIP generate passes sep_token_id as eos.
        self.sep_token_id = int(text_config.sep_token_id)
        self.pad_token_id = int(text_config.pad_token_id)
        self.spec = spec
        self.freeze_text()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise UserError(
            f"{self.spec} is a captioning model: it has no text encoder, so it cannot embed texts. "
            "Fine-tune it with the paper's Eq. 8 (b*L_VSSE + c*L_SCA, i.e. a = 0), and evaluate it with "
            "trainables.evaluation.captioning (attacks crafted on a retrieval surrogate)"
        )

    @torch.no_grad()
    def generate_captions(self, pixels: torch.Tensor, max_length: int = 20, min_length: int = 5, num_beams: int = 3,
                          prompt: str = CAPTION_PROMPT) -> list[str]:
        """Captions of [0, 1] pixels (B, 3, H, W), decoded from the *trainable* ViT's tokens.

        Defaults are BLIP's COCO captioning evaluation (beam 3, lengths 5-20 tokens,
        prompt "a picture of ", which is stripped from the output). ``prompt=""`` decodes
        unconditionally from [DEC] alone.
        """
        image_embeds = self.vision.tokens(self.normalize(pixels))
        batch = image_embeds.shape[0]
        if prompt:
            # As transformers' BlipForConditionalGeneration.generate: [DEC] + prompt, without the final [SEP].
            input_ids = self.tokenizer([prompt] * batch, return_tensors="pt")["input_ids"].to(image_embeds.device)
            input_ids[:, 0] = self.bos_token_id
            input_ids = input_ids[:, :-1]
        else:
            input_ids = torch.full((batch, 1), self.bos_token_id, dtype=torch.long, device=image_embeds.device)
        output = self.text_decoder.generate(
            input_ids=input_ids,
            eos_token_id=self.sep_token_id,
            pad_token_id=self.pad_token_id,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            max_length=max_length,
            min_length=min_length,
            num_beams=num_beams,
            do_sample=False,
        )
        captions = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [caption.strip().removeprefix(prompt.strip()).strip() for caption in captions]


def _stored_temperature(path: Path) -> torch.Tensor | None:
    """The ``temp`` entry of the folder's weight file(s), or None when they hold none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [path / weight_map[TEMP_KEY]] if TEMP_KEY in weight_map else []
    else:
        files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            if TEMP_KEY in weights.keys():
                return weights.get_tensor(TEMP_KEY)
    if not files and (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return state.get(TEMP_KEY)
    return None


def checkpoint_logit_scale(path: Path, blip: BlipForImageTextRetrieval) -> float:
    """BLIP's ITC logit scale ``1 / temp`` for the folder ``path`` holding ``blip``.

    ``temp`` from the weight file when it has one (clamped to BLIP's [0.001, 0.5]); else
    ``exp(config.logit_scale_init_value)``, the temperature the folder's config states
    (transformers' ``BlipForImageTextRetrieval`` keeps no learnt temperature; Salesforce's
    ``blip-itm-*`` folders were converted from BLIP's ``BLIP_ITM``, which has none).
    """
    temp = _stored_temperature(path)
    if temp is None:
        return math.exp(float(blip.config.logit_scale_init_value))
    if temp.numel() != 1 or not torch.isfinite(temp).all() or float(temp) <= 0:
        raise UserError(f"'{TEMP_KEY}' in the weights of {path} is {temp.tolist()}, not one positive number: "
                        "BLIP's ITC temperature is a scalar such as 0.07; remove the entry or re-save the model")
    return 1.0 / float(temp.float().clamp(*TEMP_RANGE))


def load_hf_blip_retrieval(path: Path, spec: str) -> BlipRetrievalVLP:
    """The ``BlipForImageTextRetrieval`` saved in ``path`` behind the platform interface."""
    from transformers import BlipForImageTextRetrieval

    read_model_config(path, "hf-blip-itr", "BlipForImageTextRetrieval", "blip")
    blip = load_pretrained(BlipForImageTextRetrieval, path)
    mean, std = image_statistics(path)
    return BlipRetrievalVLP(blip, load_tokenizer(path), mean, std, spec, logit_scale=checkpoint_logit_scale(path, blip))


def load_hf_blip_caption(path: Path, spec: str) -> BlipCaptionVLP:
    """The ``BlipForConditionalGeneration`` saved in ``path`` behind the platform interface."""
    from transformers import BlipForConditionalGeneration

    read_model_config(path, "hf-blip-cap", "BlipForConditionalGeneration", "blip")
    blip = load_pretrained(BlipForConditionalGeneration, path)
    mean, std = image_statistics(path)
    return BlipCaptionVLP(blip, load_tokenizer(path), mean, std, spec)
