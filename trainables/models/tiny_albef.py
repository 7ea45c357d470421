"""``tiny-albef`` and ``tiny-tcl``: embedded fusion-encoder models, small ALBEFs pretrained on the synthetic world.

Nothing is downloaded. The first use writes a word-level vocabulary of the synthetic
world (``vocab.txt``) and an ALBEF ``config_bert.json``, pretrains the model with a
progress bar, and caches everything in ``$MAVA_CACHE_DIR/tiny-<family>-<hash of the
config and vocabulary>/`` (default ``~/.cache/mava-platform``). Pretraining has three
stages. Two unimodal ones stand in for ALBEF's DeiT/BERT initialisation: a supervised
image stage (``supervised_start``: the ViT classifies the world's attributes, as DeiT
classifies ImageNet) and a warm start (``warm_start``: ITC, with the attribute heads kept
on the CLS so that it does not forget position). Then the joint stage, one loop with two
objective sets:

* ``albef`` (``tiny-albef``): ALBEF's ITC; ITM with hard negatives sampled from the ITC
  similarities; MLM (no momentum distillation or queues);
* ``tcl`` (``tiny-tcl``, another seed): ALBEF's terms plus TCL's intra-modal contrast
  (image-image, text-text) and local mutual information (global feature vs. pooled
  patches / text tokens), against an EMA copy of the encoders that sees a second view.

In both, a batch item whose scene has the same captioned attributes as the anchor is
never used as a negative (it is a positive with the label 0): the synthetic world has
only 3600 attribute combinations, so such pairs occur in batches.

Weights are stored in ALBEF's own key layout, so the folder also loads as
``albef:DIR@DIR/weights.safetensors``. Regenerate with
``python -m trainables.models.tiny_albef --force`` (``--objectives tcl`` for tiny-tcl).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from trainables.models.albef import ALBEF_MEAN, ALBEF_STD, AlbefNet, AlbefVLP, build_albef, load_albef
from trainables.models.albef_bert import BertConfig
from trainables.models.albef_checkpoint import inference_state, read_bert_config
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer, pre_caption
from trainables.models.albef_vit import VitConfig
from trainables.models.tiny_clip import cache_dir, first_use_lock
from trainables.models.weights import read_state_dict

if TYPE_CHECKING:  # the world is imported where it is built: only pretraining needs it
    from trainables.data.synthetic import SyntheticWorld

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WEIGHTS_FILE = "weights.safetensors"
CAPTIONS = 5  # captions per synthetic image
TCL_BRIGHTNESS = 0.1  # tcl second view: brightness factor in [0.9, 1.1] (colour-preserving)


OBJECTIVES = ("albef", "tcl")  # objective sets of the one pretraining loop; also the family of the result


@dataclass(frozen=True)
class TinyAlbefConfig:
    """Architecture and pretraining recipe; any change gives a new cache key."""

    image_size: int = 32
    patch_size: int = 4  # 8x8 patches
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 2  # text-only layers (fusion_layer)
    fusion_layers: int = 2  # layers with cross-attention to the image
    heads: int = 2
    max_tokens: int = 32
    embed_dim: int = 64
    train_images: int = 4000
    # The joint stage (ITC + ITM + MLM): 620 steps after the warm start. With the attribute heads, 12 epochs took
    # 614 s in all (over the 10-minute goal) for ITM re-ranked TR@1 73.8; 10 epochs take 546 s for 70.0.
    epochs: int = 10
    batch_size: int = 64
    # ALBEF pretrains at 1e-4 from DeiT/BERT weights; after the warm start, 3e-4 x 12 epochs gave
    # ITC TR@1 31.8 and ITM loss 0.504 where 1e-4 x 6 gave 26.6 and 0.605 (docs/models-and-data.md).
    lr: float = 3e-4
    # The stand-in for ALBEF's initialisation from an ImageNet DeiT and a pretrained BERT, in two
    # unimodal stages before the joint one (docs/models-and-data.md, "tiny-albef and tiny-tcl: measured"):
    # 1. supervised image stage: the ViT's CLS classifies the world's attributes (one linear head each,
    #    dropped afterwards), as DeiT classifies ImageNet. 0: no such stage.
    # 2. warm start: the ViT, the text layers and the projections learn ITC alone (no fusion), tiny-clip's
    #    recipe. 0: no warm start. From scratch with the joint objectives only, 375 steps left the ViT seeing
    #    colour and background and the ITM head at its prior (clean TR@1 8.2).
    # Stage 1 (300 steps) with a warm start of 10 epochs instead of 20 took ITM re-ranked TR@1 from 26.6 to
    # 40.4 on 500 test images (one pretraining each; which of the two changes did it is not separated).
    supervised_steps: int = 300
    supervised_lr: float = 5e-4
    # 3. the supervised stage's attribute heads stay on the ViT's CLS through the warm start, their summed
    #    cross-entropy added to ITC with this weight (0: dropped after stage 1); the joint stage keeps ALBEF's
    #    (TCL's) objectives alone. Without them the warm start let the CLS forget position (a linear probe: 62%
    #    after stage 1, 30% after pretraining) and most ITC top-1 errors were a wrong position; with them ITM
    #    re-ranked TR@1 on 500 test images rose from 40.4 to 74.0 for both families (one-thread pilots;
    #    docs/models-and-data.md, "tiny-albef and tiny-tcl: measured").
    attribute_weight: float = 1.0
    warm_images: int = 5000
    warm_epochs: int = 10
    warm_batch_size: int = 128
    warm_lr: float = 1e-3
    warmup: float = 0.1  # fraction of the steps with a rising learning rate (OneCycle, then cosine down)
    weight_decay: float = 0.02
    mlm_probability: float = 0.15
    objectives: str = "albef"  # "albef" or "tcl" (OBJECTIVES)
    momentum: float = 0.99  # tcl: EMA of the encoders that embed the second view (TCL: 0.995 over far more steps)
    seed: int = 0

    def cache_key(self) -> str:
        """A hash of the recipe and of the vocabulary (a new word is a new embedding table)."""
        fields = {**asdict(self), "vocabulary": world_vocabulary()}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


TINY_TCL = TinyAlbefConfig(objectives="tcl", seed=1)  # tiny-tcl: the same architecture, TCL's objectives, another seed
# The embedded fusion models by family (= their objectives): tiny-albef and tiny-tcl.
CONFIGS: dict[str, TinyAlbefConfig] = {"albef": TinyAlbefConfig(), "tcl": TINY_TCL}


@functools.cache
def world_vocabulary() -> tuple[str, ...]:
    """Special tokens + every word of the synthetic world's texts after ``pre_caption``.

    The texts: every caption of every attribute combination, every entailment hypothesis
    template (each attribute value, both numbers, every phrasing variant and hidden clause)
    and every grounding expression template, so no word of the embedded tasks is ``[UNK]``.
    """
    from trainables.data import synthetic_ve, synthetic_vg
    from trainables.data.synthetic import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, Scene, describe

    texts = [caption for combination in itertools.product(SHAPES, COLOURS, SIZES, COUNTS, POSITIONS, BACKGROUNDS)
             for caption in describe(Scene(*combination))]
    for attribute, domain in synthetic_ve.DOMAINS.items():
        for value, count, variant, hidden in itertools.product(domain, COUNTS, range(10), (None, *synthetic_ve.HIDDEN_CLAUSES)):
            texts.append(synthetic_ve.statement({attribute: value}, count, hidden, variant))
    texts += [f"the {size} {colour} {shape} {phrase}" for size, colour, shape, phrase
              in itertools.product(SIZES, COLOURS, (*SHAPES, "shape"), synthetic_vg.POSITION_PHRASES.values())]
    words = {word for text in texts for word in pre_caption(text).split()}
    return (*SPECIAL_TOKENS, *sorted(words))


def bert_config(config: TinyAlbefConfig, vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=config.text_width, num_hidden_layers=config.text_layers + config.fusion_layers,
                      num_attention_heads=config.heads, intermediate_size=4 * config.text_width,
                      max_position_embeddings=config.max_tokens, fusion_layer=config.text_layers, encoder_width=config.vision_width)


def vit_config(config: TinyAlbefConfig) -> VitConfig:
    return VitConfig(image_size=config.image_size, patch_size=config.patch_size, width=config.vision_width,
                     depth=config.vision_layers, heads=config.heads, mlp_hidden=4 * config.vision_width)


def model_dir(config: TinyAlbefConfig = TinyAlbefConfig()) -> Path:
    """``<cache>/tiny-<objectives>-<config hash>``: tiny-albef and tiny-tcl each in their own folder."""
    if config.objectives not in OBJECTIVES:
        raise ValueError(f"unknown objectives {config.objectives!r}: use one of {', '.join(OBJECTIVES)}")
    return cache_dir() / f"tiny-{config.objectives}-{config.cache_key()}"


def write_text_files(directory: Path, config: TinyAlbefConfig) -> None:
    """``vocab.txt`` and ALBEF's ``config_bert.json`` for the tiny model (deterministic, so rewriting is harmless)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = world_vocabulary()
    fields = {**asdict(bert_config(config, len(vocabulary))), "hidden_act": "gelu", "model_type": "bert"}
    for name, text in (("vocab.txt", "\n".join(vocabulary) + "\n"), ("config_bert.json", json.dumps(fields, indent=1))):
        # Temporary name first: a concurrent reader (another trial) never sees half a file.
        partial = directory / f"{name}.partial-{os.getpid()}"
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, directory / name)


class MlmHead(nn.Module):
    """BERT's MLM prediction head (transform + decoder); used in pretraining only, never saved."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class AttributeHeads(nn.Module):
    """One linear classifier per captioned attribute (shape, colour, size, count, position, background) on the
    ViT's CLS; used in pretraining only, never saved (as DeiT's ImageNet classifier is not part of ALBEF)."""

    def __init__(self, width: int):
        super().__init__()
        from trainables.data.synthetic_ve import DOMAINS  # every captioned attribute and its values

        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in DOMAINS.items()})

    @staticmethod
    def labels(world: SyntheticWorld) -> dict[str, torch.Tensor]:
        """(N,) class index per attribute for every scene of ``world``."""
        from trainables.data.synthetic_ve import DOMAINS

        return {name: torch.tensor([values.index(getattr(scene, name)) for scene in world.scenes]) for name, values in DOMAINS.items()}

    def forward(self, cls: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed cross-entropies of the batch's CLS features against its (B,) labels per attribute."""
        return sum(F.cross_entropy(head(cls), labels[name]) for name, head in self.heads.items())


def _mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: AlbefTokenizer, probability: float,
                 vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``probability`` of the words chosen; 80% -> [MASK], 10% random, 10% kept. Labels -100 elsewhere."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & attention_mask.bool()
    chosen[:, 0] = False  # never [CLS]
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    masked[chosen & (draw < 0.8)] = tokenizer.mask_id
    random_positions = chosen & (draw >= 0.8) & (draw < 0.9)
    masked[random_positions] = torch.randint(len(SPECIAL_TOKENS), vocab_size, (int(random_positions.sum()),), generator=generator)
    return masked, labels


def scene_ids(world) -> torch.Tensor:
    """(N,) one integer per image naming its captioned attributes: equal ids = the same captions."""
    keys = [(s.shape, s.colour, s.size, s.count, s.position, s.background) for s in world.scenes]
    index = {key: i for i, key in enumerate(sorted(set(keys)))}
    return torch.tensor([index[key] for key in keys])


def _contrast(query: torch.Tensor, keys: torch.Tensor, temp: torch.Tensor, same_scene: torch.Tensor) -> torch.Tensor:
    """InfoNCE of row i against key i, other keys of the same scene left out of the negatives."""
    logits = (query @ keys.T / temp).masked_fill(same_scene & ~torch.eye(len(query), dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(query)))


def _hard_negatives(sim: torch.Tensor, same_scene: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) one negative per row drawn with probability softmax(sim) (+ ALBEF's 1e-4), never of the row's scene.

    A row whose every other item shares its scene (only in tiny hand batches) falls back to any other item.
    """
    weights = (F.softmax(sim.float(), dim=1) + 1e-4).masked_fill(same_scene, 0.0)
    fallback = weights.sum(dim=1) == 0
    weights[fallback] = (~torch.eye(len(sim), dtype=torch.bool))[fallback].float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def albef_losses(net: AlbefNet, mlm: MlmHead, pixels: torch.Tensor, tokens: dict[str, torch.Tensor],
                 masked: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 same_scene: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """ALBEF's pretraining terms on one batch (``models/model_pretrain.py`` without momentum distillation).

    Args:
        same_scene: (B, B) bool, items with the same captioned attributes (default: only the
            diagonal); they are neither ITC negatives nor ITM hard negatives of each other.

    The returned ``features`` (not a loss) are the normalised ITC features, for TCL's terms.
    """
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if same_scene is None:
        same_scene = torch.eye(len(ids), dtype=torch.bool)
    image_embeds = net.visual_encoder.tokens(pixels)
    image_feat = F.normalize(net.vision_proj(image_embeds[:, 0]), dim=-1)
    text_embeds = net.text_encoder.text(ids, mask)
    text_feat = F.normalize(net.text_proj(text_embeds[:, 0]), dim=-1)
    loss_itc = (_contrast(image_feat, text_feat, net.temp, same_scene) + _contrast(text_feat, image_feat, net.temp, same_scene)) / 2

    # ITM with hard negatives: one negative text per image and one negative image per text,
    # drawn with probability softmax(sim) over the other items of the batch.
    with torch.no_grad():
        sim_i2t = image_feat @ text_feat.T / net.temp
        negative_text = _hard_negatives(sim_i2t, same_scene, generator)
        negative_image = _hard_negatives(sim_i2t.T, same_scene, generator)
    fusion_images = torch.cat([image_embeds, image_embeds, image_embeds[negative_image]])
    fusion_texts = torch.cat([text_embeds, text_embeds[negative_text], text_embeds])
    fusion_masks = torch.cat([mask, mask[negative_text], mask])
    fused = net.text_encoder.fusion(fusion_texts, fusion_masks, fusion_images)[:, 0]
    itm_labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
    loss_itm = F.cross_entropy(net.itm_head(fused), itm_labels)

    masked_hidden = net.text_encoder.fusion(net.text_encoder.text(masked, mask), mask, image_embeds)
    loss_mlm = F.cross_entropy(mlm(masked_hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
    return {"loss": loss_itc + loss_itm + loss_mlm, "itc": loss_itc, "itm": loss_itm, "mlm": loss_mlm,
            "features": (image_feat, text_feat)}


def pool_patches(patches: torch.Tensor, pooled_grid: int = 4) -> torch.Tensor:
    """(B, g*g, D) patch features averaged to (B, pooled_grid**2, D) (TCL's ``patch_pooling``: 16 local features)."""
    batch, count, width = patches.shape
    grid = int(round(count ** 0.5))
    square = patches.transpose(1, 2).reshape(batch, width, grid, grid)
    return F.adaptive_avg_pool2d(square, pooled_grid).flatten(2).transpose(1, 2)


def global_local_loss(local: torch.Tensor, global_: torch.Tensor, temp: torch.Tensor,
                      local_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TCL's local mutual information (``in_batch_g2l_loss``): each local feature of item n picks item n's global feature.

    For every valid local l of item n: positive ``<l, g_n>``, negatives ``<l', g_n>`` for every
    valid local l' of every other item; -log softmax of the positive, averaged over item n's
    valid locals, then over items. ``local`` (N, L, D), ``global_`` (N, D), both normalised;
    ``local_mask`` (N, L), 1 = a real token (text), None = all valid (image patches).
    """
    count, locals_, _ = local.shape
    valid = torch.ones(count, locals_, dtype=torch.bool) if local_mask is None else local_mask.bool()
    positive = torch.einsum("nld,nd->nl", local, global_) / temp  # (N, L)
    scores = torch.einsum("md,nld->mnl", global_, local) / temp  # (N global, N items, L): g_m against item n's locals
    own = torch.eye(count, dtype=torch.bool)[:, :, None]
    negatives = scores.masked_fill(own | ~valid[None], float("-inf")).reshape(count, 1, count * locals_)
    logits = torch.cat([positive[:, :, None], negatives.expand(-1, locals_, -1)], dim=2)
    nll = -F.log_softmax(logits, dim=2)[:, :, 0]  # (N, L)
    return ((nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)).mean()


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` (ALBEF/TCL's ``_momentum_update``)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def tcl_losses(net: AlbefNet, ema: AlbefNet, image_feat: torch.Tensor, text_feat: torch.Tensor, pixels_view: torch.Tensor,
               tokens_view: dict[str, torch.Tensor], same_scene: torch.Tensor) -> dict[str, torch.Tensor]:
    """TCL's intra-modal and local-MI terms (``uta-smile/TCL:models/model_pretrain.py``), without queues.

    The targets come from ``ema`` (the momentum encoders, no gradient) on a second view:
    ``pixels_view`` (another shift and brightness) and ``tokens_view`` (another phrasing of
    the same scene, our text augmentation: TCL re-encodes the same text with the momentum
    encoder, whose dropout differs; this BERT has no dropout). Returns ``i2i``, ``t2t`` (InfoNCE
    of the online feature against the batch's momentum features, same-scene items left out),
    ``g2l_image`` (online global image feature vs. the momentum view's 16 pooled patches) and
    ``g2l_text`` (online text feature vs. the momentum view's token features, [CLS] excluded).
    """
    with torch.no_grad():
        image_embeds_m = ema.visual_encoder.tokens(pixels_view)
        image_feat_m = F.normalize(ema.vision_proj(image_embeds_m[:, 0]), dim=-1)
        image_local_m = pool_patches(F.normalize(ema.vision_proj(image_embeds_m[:, 1:]), dim=-1))
        text_embeds_m = ema.text_encoder.text(tokens_view["input_ids"], tokens_view["attention_mask"])
        text_feat_m = F.normalize(ema.text_proj(text_embeds_m[:, 0]), dim=-1)
        text_local_m = F.normalize(ema.text_proj(text_embeds_m[:, 1:]), dim=-1)
    return {"i2i": _contrast(image_feat, image_feat_m, net.temp, same_scene),
            "t2t": _contrast(text_feat, text_feat_m, net.temp, same_scene),
            "g2l_image": global_local_loss(image_local_m, image_feat, net.temp),
            "g2l_text": global_local_loss(text_local_m, text_feat, net.temp, tokens_view["attention_mask"][:, 1:])}


def _view(images: torch.Tensor, generator: torch.Generator, brightness: float) -> torch.Tensor:
    """A random 1-pixel shift (as tiny-clip's pretraining) and a brightness factor in [1 - b, 1 + b].

    The factor scales every channel alike, so hues (which the captions name) are kept.
    """
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    view = torch.roll(images, shifts=shift, dims=(2, 3))
    if brightness:
        factor = 1.0 + brightness * (2 * torch.rand(len(images), 1, 1, 1, generator=generator) - 1)
        view = (view * factor).clamp(0.0, 1.0)
    return view


def _steps(scenes: torch.Tensor, batch_size: int, epochs: int, generator: torch.Generator):
    """Per step ``(index, same_scene, which)``: a fresh order of the images each epoch, the (B, B) same-scene
    mask, and one random caption of each image (all 5 phrasings get seen over the epochs)."""
    for _ in range(epochs):
        order = torch.randperm(len(scenes), generator=generator)
        for step in range(len(scenes) // batch_size):
            index = order[step * batch_size:(step + 1) * batch_size]
            yield index, scenes[index][:, None] == scenes[index][None, :], torch.randint(0, CAPTIONS, (len(index),), generator=generator)


def train_split(config: TinyAlbefConfig, tokenizer: AlbefTokenizer) -> tuple[SyntheticWorld, list[list[list[int]]]]:
    """The train scenes every stage draws from, rendered once, and their captions tokenised once.

    Item i depends only on (split, seed, i), so the first ``warm_images`` / ``train_images`` of the
    larger world are the smaller worlds the stages name; the stages share them instead of rendering
    and tokenising again (the same computation; it saves about 7 s of the pretraining).
    """
    from trainables.data.synthetic import SyntheticWorld  # local: only needed when pretraining

    world = SyntheticWorld("train", max(config.train_images, config.warm_images), image_size=config.image_size, seed=config.seed)
    return world, [tokenizer.pieces(list(captions)) for captions in world.captions]


def _caption_batch(tokenizer: AlbefTokenizer, pieces: list[list[list[int]]], index: torch.Tensor, which: torch.Tensor) -> dict[str, torch.Tensor]:
    """Caption ``which[k]`` of image ``index[k]`` for every k, padded as ``tokenizer(...)`` pads them."""
    return tokenizer.pad([pieces[i][w] for i, w in zip(index.tolist(), which.tolist())])


def supervised_start(net: AlbefNet, heads: AttributeHeads, labels: dict[str, torch.Tensor], config: TinyAlbefConfig,
                     world: SyntheticWorld, progress: bool = True) -> None:
    """Attribute classification on the ViT's CLS, in place: the stand-in for DeiT's supervised ImageNet weights.

    ``supervised_steps`` steps of batch ``warm_batch_size`` over the first ``warm_images`` scenes of
    ``world`` (:func:`train_split`, ``labels`` from :meth:`AttributeHeads.labels`); one linear head per
    captioned attribute, summed cross-entropies, AdamW with OneCycle to ``supervised_lr``. The ViT and
    ``heads`` learn; the heads are never saved, as DeiT's classifier is not.
    """
    generator = torch.Generator().manual_seed(config.seed + 2000)  # its own stream, like the warm start's
    images = world.images[:config.warm_images].float().div_(255.0)
    parameters = list(net.visual_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.supervised_lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.supervised_lr, total_steps=config.supervised_steps,
                                                    pct_start=config.warmup)
    mean, std = torch.tensor(ALBEF_MEAN).view(1, 3, 1, 1), torch.tensor(ALBEF_STD).view(1, 3, 1, 1)
    net.train()
    bar = tqdm(total=config.supervised_steps, desc=f"tiny-{config.objectives}: supervised image stage (first use only)",
               disable=not progress, unit="step")
    for _ in range(config.supervised_steps):
        index = torch.randint(0, config.warm_images, (config.warm_batch_size,), generator=generator)
        cls = net.visual_encoder.tokens((_view(images[index], generator, 0.0) - mean) / std)[:, 0]
        loss = heads(cls, {name: values[index] for name, values in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def warm_start(net: AlbefNet, heads: AttributeHeads, labels: dict[str, torch.Tensor], config: TinyAlbefConfig,
               tokenizer: AlbefTokenizer, world: SyntheticWorld, pieces: list[list[list[int]]], progress: bool = True) -> None:
    """ITC on the ViT, the text layers and the projections (the attribute heads kept on the CLS), in place.

    ALBEF and TCL start from an ImageNet DeiT and a pretrained BERT; nothing is downloaded here,
    so the encoders first learn the synthetic world contrastively with tiny-clip's recipe (the
    first ``warm_images`` of ``world``, their captions tokenised as ``pieces``; ``warm_epochs``,
    batch ``warm_batch_size``, OneCycle to ``warm_lr``), same-scene items left out of the
    negatives, plus ``attribute_weight`` times the attribute ``heads``' loss on the CLS. The
    fusion layers, the ITM head and the MLM head are untouched: they learn in the joint stage.
    """
    # Its own stream (seed + 1000): the warm stage's images and order do not change the joint stage's.
    generator = torch.Generator().manual_seed(config.seed + 1000)
    images = world.images[:config.warm_images].float().div_(255.0)
    scenes = scene_ids(world)[:config.warm_images]
    mean, std = torch.tensor(ALBEF_MEAN).view(1, 3, 1, 1), torch.tensor(ALBEF_STD).view(1, 3, 1, 1)
    text = net.text_encoder
    encoders = [net.visual_encoder, net.vision_proj, net.text_proj, text.embeddings, *text.encoder.layer[:text.config.fusion_layer]]
    if config.attribute_weight:
        encoders.append(heads)
    parameters = [net.temp] + [p for module in encoders for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.warm_lr, weight_decay=config.weight_decay)
    total_steps = config.warm_images // config.warm_batch_size * config.warm_epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.warm_lr, total_steps=total_steps, pct_start=config.warmup)
    net.train()
    bar = tqdm(total=total_steps, desc=f"tiny-{config.objectives}: unimodal warm start (first use only)", disable=not progress, unit="step")
    for index, same_scene, which in _steps(scenes, config.warm_batch_size, config.warm_epochs, generator):
        tokens = _caption_batch(tokenizer, pieces, index, which)
        pixels = (_view(images[index], generator, 0.0) - mean) / std
        cls = net.visual_encoder.tokens(pixels)[:, 0]
        image_feat = F.normalize(net.vision_proj(cls), dim=-1)
        text_feat = F.normalize(net.text_proj(net.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])[:, 0]), dim=-1)
        itc = (_contrast(image_feat, text_feat, net.temp, same_scene) + _contrast(text_feat, image_feat, net.temp, same_scene)) / 2
        attributes = heads(cls, {name: values[index] for name, values in labels.items()}) if config.attribute_weight else torch.zeros(())
        loss = itc + config.attribute_weight * attributes
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            net.temp.clamp_(0.001, 0.5)
        bar.update(1)
        bar.set_postfix(itc=f"{itc.item():.3f}", attributes=f"{attributes.item():.3f}", temp=f"{net.temp.item():.3f}")
    bar.close()


def pretrain(config: TinyAlbefConfig, directory: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """Pretrain the tiny ALBEF on the synthetic train split with ``config.objectives``; its state dict in ALBEF's layout."""
    tcl = config.objectives == "tcl"
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(directory), max_tokens=config.max_tokens)
    world, pieces = train_split(config, tokenizer)
    images = world.images[:config.train_images].float().div_(255.0)
    scenes = scene_ids(world)[:config.train_images]
    vocab_size = len(tokenizer.tokenizer.get_vocab())
    net = AlbefNet(vit_config(config), bert_config(config, vocab_size), frozenset({"itm"}), config.embed_dim)
    mlm = MlmHead(config.text_width, vocab_size)
    heads, attributes = AttributeHeads(config.vision_width), AttributeHeads.labels(world)  # dropped after the warm start
    if config.supervised_steps:
        supervised_start(net, heads, attributes, config, world, progress)
    if config.warm_epochs:
        warm_start(net, heads, attributes, config, tokenizer, world, pieces, progress)
    ema = copy.deepcopy(net).requires_grad_(False) if tcl else None
    parameters = list(net.parameters()) + list(mlm.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.train_images // config.batch_size * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup)
    mean, std = torch.tensor(ALBEF_MEAN).view(1, 3, 1, 1), torch.tensor(ALBEF_STD).view(1, 3, 1, 1)
    net.train()
    bar = tqdm(total=total_steps, desc=f"pretraining tiny-{config.objectives} (first use only)", disable=not progress, unit="step")
    for index, same_scene, which in _steps(scenes, config.batch_size, config.epochs, generator):
        tokens = _caption_batch(tokenizer, pieces, index, which)
        masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, config.mlm_probability,
                                      vocab_size, generator)
        pixels = (_view(images[index], generator, 0.0) - mean) / std
        terms = albef_losses(net, mlm, pixels, tokens, masked, labels, generator, same_scene)
        image_feat, text_feat = terms.pop("features")
        if tcl:
            # The second view: another shift and brightness; another phrasing of the same scene.
            other = (which + torch.randint(1, CAPTIONS, (len(index),), generator=generator)) % CAPTIONS
            tokens_view = _caption_batch(tokenizer, pieces, index, other)
            pixels_view = (_view(images[index], generator, TCL_BRIGHTNESS) - mean) / std
            terms.update(tcl_losses(net, ema, image_feat, text_feat, pixels_view, tokens_view, same_scene))
            # TCL's loss_ita: the mean of its 6 contrastive terms (i2t, t2i as ALBEF's ITC counts twice).
            ita = (2 * terms["itc"] + terms["i2i"] + terms["t2t"] + terms["g2l_image"] + terms["g2l_text"]) / 6
            terms["loss"] = ita + terms["itm"] + terms["mlm"]
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            net.temp.clamp_(0.001, 0.5)  # ALBEF's clamp
        if ema is not None:
            ema_update(ema, net, config.momentum)
        bar.update(1)
        bar.set_postfix({key: f"{value.item():.3f}" for key, value in terms.items()})
    bar.close()
    return {key: value.detach().contiguous() for key, value in net.state_dict().items()}


def ensure_pretrained(config: TinyAlbefConfig = TinyAlbefConfig(), force: bool = False, progress: bool = True) -> Path:
    """The cache folder (vocab, config, weights), pretraining the weights first if they are not cached yet."""
    directory = model_dir(config)
    weights = directory / WEIGHTS_FILE
    if weights.is_file() and not force:
        return directory
    with first_use_lock(weights, f"tiny-{config.objectives}"):
        if weights.is_file() and not force:  # made while this process waited for the lock
            return directory
        write_text_files(directory, config)
        started = time.perf_counter()
        state = pretrain(config, directory, progress=progress)
        # Write to a temporary name first so a reader that takes no lock never sees half a file.
        partial = weights.with_suffix(f".partial-{os.getpid()}")
        save_file(state, str(partial), metadata={"config": json.dumps(asdict(config)), "pretrain_seconds": f"{time.perf_counter() - started:.1f}"})
        os.replace(partial, weights)
    return directory


def pretrained_weights(config: TinyAlbefConfig = TinyAlbefConfig()) -> Path:
    """The cached weights file (pretrained first if missing): what a sweep pins and copies (``embedded.resolve_model``)."""
    return ensure_pretrained(config) / WEIGHTS_FILE


def text_files_dir(weights: Path) -> Path:
    """The folder of a fine-tuned tiny model's tokenizer files: beside ``weights``, or (e.g. for a sweep's
    content-addressed copy) a cache folder they are written to; deterministic files, never trained, and the same
    for every family (one architecture and vocabulary)."""
    if all((weights.parent / name).is_file() for name in ("vocab.txt", "config_bert.json")):
        return weights.parent
    directory = cache_dir() / "tiny-albef-ve-text"  # the name the VE loader has always used
    write_text_files(directory, TinyAlbefConfig())
    return directory


def load_finetuned(weights: Path, model_class: type[AlbefVLP], spec: str) -> AlbefVLP:
    """A fine-tuned tiny model (``tiny-*-ve``, ``tiny-*-vg``) from its weights file, as ``model_class``, in eval mode."""
    text_dir = text_files_dir(weights)
    net = build_albef(inference_state(read_state_dict(weights)), read_bert_config(text_dir), str(weights))
    return model_class(net, AlbefTokenizer(load_bert_tokenizer(text_dir)), spec).eval()


def load_tiny_albef(spec: str, weights: str | None = None, config: TinyAlbefConfig = TinyAlbefConfig()) -> AlbefVLP:
    """``tiny-albef``/``tiny-tcl`` (pretrained and cached on first use), or its architecture with ``weights``.

    The family (``AlbefVLP`` or ``TclVLP``) is ``config.objectives``.
    """
    if weights is None:
        directory = ensure_pretrained(config)
        weights = str(directory / WEIGHTS_FILE)
    else:
        directory = model_dir(config)
        write_text_files(directory, config)
    return load_albef(directory, weights, spec, family=config.objectives)


@torch.no_grad()
def clean_recall(model: AlbefVLP, num_images: int = 500, k_test: int = 16) -> dict[str, dict[str, float]]:
    """Clean TR/IR@K on ``synthetic:test,n=num_images``: ITC only, and the ITC top-``k_test`` re-scored.

    ``itm`` is ALBEF's rule (the raw ITM logit alone, ``Retrieval.py:evaluation``), ``itc+itm``
    BLIP's sum; both through the platform's ``rerank_similarity``.
    """
    from trainables.data.synthetic import SyntheticWorld
    from trainables.evaluation.rerank import RerankedScores, itc_similarity, recall_from_scores, rerank_similarity

    world = SyntheticWorld("test", num_images, image_size=model.image_size, seed=0)
    images = world.images.float().div(255.0)
    captions = [caption for group in world.captions for caption in group]
    text_to_image = torch.arange(num_images).repeat_interleave(len(world.captions[0]))
    image_features = torch.cat([model.encode_image(images[i:i + 100]) for i in range(0, num_images, 100)])
    text_features = torch.cat([model.encode_text(captions[i:i + 500]) for i in range(0, len(captions), 500)])
    similarity = itc_similarity(image_features, text_features)
    return {"itc": recall_from_scores(RerankedScores(similarity, similarity), text_to_image),
            **{rule: recall_from_scores(rerank_similarity(model, images, captions, similarity, k_test, rule=rule), text_to_image)
               for rule in ("itm", "itc+itm")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached weights exist")
    parser.add_argument("--objectives", choices=OBJECTIVES, default="albef", help="albef: tiny-albef; tcl: tiny-tcl (its own seed)")
    parser.add_argument("--train-images", type=int, help="recipe change (another cache key)")
    parser.add_argument("--epochs", type=int, help="recipe change (another cache key)")
    parser.add_argument("--evaluate", type=int, default=0, metavar="N", help="then print clean recall on N synthetic test images")
    args = parser.parse_args()
    config = CONFIGS[args.objectives]
    changes = {key: value for key, value in (("train_images", args.train_images), ("epochs", args.epochs)) if value is not None}
    config = replace(config, **changes)
    started = time.perf_counter()
    directory = ensure_pretrained(config, force=args.force)
    print(f"tiny-{config.objectives}: {directory} ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.evaluate:
        model = load_tiny_albef(f"tiny-{config.objectives}", str(directory / WEIGHTS_FILE), config)
        for rule, metrics in clean_recall(model, args.evaluate).items():
            print(rule, {key: round(value, 1) for key, value in metrics.items()})


if __name__ == "__main__":
    main()
