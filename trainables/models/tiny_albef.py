"""``tiny-albef``: an embedded fusion-encoder model, a small ALBEF pretrained on the synthetic world.

Nothing is downloaded. The first use writes a word-level vocabulary of the synthetic
world (``vocab.txt``) and an ALBEF ``config_bert.json``, pretrains the model with
ALBEF's objectives (ITC; ITM with hard negatives sampled from the ITC similarities;
MLM; no momentum distillation or queues) with a progress bar, and caches everything
in ``$MAVA_CACHE_DIR/tiny-albef-<hash of the config>/`` (default ``~/.cache/mava-platform``).
Weights are stored in ALBEF's own key layout, so the folder also loads as
``albef:DIR@DIR/weights.safetensors``. Regenerate with
``python -m trainables.models.tiny_albef --force``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from trainables.models.albef import ALBEF_MEAN, ALBEF_STD, AlbefNet, AlbefVLP, load_albef
from trainables.models.albef_bert import BertConfig
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer, pre_caption
from trainables.models.albef_vit import VitConfig
from trainables.models.tiny_clip import cache_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WEIGHTS_FILE = "weights.safetensors"


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
    train_images: int = 5000
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.02
    mlm_probability: float = 0.15
    seed: int = 0

    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def world_vocabulary() -> list[str]:
    """Special tokens + every word the synthetic world's captions use after ``pre_caption`` (all attribute values)."""
    from trainables.data.synthetic import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, Scene, describe

    words = set()
    for shape, colour, size, count, position, background in itertools.product(SHAPES, COLOURS, SIZES, COUNTS, POSITIONS, BACKGROUNDS):
        for caption in describe(Scene(shape, colour, size, count, position, background)):
            words.update(pre_caption(caption).split())
    return list(SPECIAL_TOKENS) + sorted(words)


def bert_config(config: TinyAlbefConfig, vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=config.text_width, num_hidden_layers=config.text_layers + config.fusion_layers,
                      num_attention_heads=config.heads, intermediate_size=4 * config.text_width,
                      max_position_embeddings=config.max_tokens, fusion_layer=config.text_layers, encoder_width=config.vision_width)


def vit_config(config: TinyAlbefConfig) -> VitConfig:
    return VitConfig(image_size=config.image_size, patch_size=config.patch_size, width=config.vision_width,
                     depth=config.vision_layers, heads=config.heads, mlp_hidden=4 * config.vision_width)


def model_dir(config: TinyAlbefConfig = TinyAlbefConfig()) -> Path:
    return cache_dir() / f"tiny-albef-{config.cache_key()}"


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


def albef_losses(net: AlbefNet, mlm: MlmHead, pixels: torch.Tensor, tokens: dict[str, torch.Tensor],
                 masked: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """ALBEF's pretraining terms on one batch (``models/model_pretrain.py`` without momentum distillation)."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    image_embeds = net.visual_encoder.tokens(pixels)
    image_feat = F.normalize(net.vision_proj(image_embeds[:, 0]), dim=-1)
    text_embeds = net.text_encoder.text(ids, mask)
    text_feat = F.normalize(net.text_proj(text_embeds[:, 0]), dim=-1)
    sim_i2t = image_feat @ text_feat.T / net.temp
    targets = torch.arange(len(ids))
    loss_itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_i2t.T, targets)) / 2

    # ITM with hard negatives: one negative text per image and one negative image per text,
    # drawn with probability softmax(sim) over the other items of the batch (ALBEF's + 1e-4).
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-4
        weights_t2i = F.softmax(sim_i2t.T.float(), dim=1) + 1e-4
        weights_i2t.fill_diagonal_(0)
        weights_t2i.fill_diagonal_(0)
        negative_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        negative_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    fusion_images = torch.cat([image_embeds, image_embeds, image_embeds[negative_image]])
    fusion_texts = torch.cat([text_embeds, text_embeds[negative_text], text_embeds])
    fusion_masks = torch.cat([mask, mask[negative_text], mask])
    fused = net.text_encoder.fusion(fusion_texts, fusion_masks, fusion_images)[:, 0]
    itm_labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
    loss_itm = F.cross_entropy(net.itm_head(fused), itm_labels)

    masked_hidden = net.text_encoder.fusion(net.text_encoder.text(masked, mask), mask, image_embeds)
    loss_mlm = F.cross_entropy(mlm(masked_hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
    return {"loss": loss_itc + loss_itm + loss_mlm, "itc": loss_itc, "itm": loss_itm, "mlm": loss_mlm}


def pretrain(config: TinyAlbefConfig, directory: Path, progress: bool = True) -> dict[str, torch.Tensor]:
    """Pretrain the tiny ALBEF on the synthetic train split; returns its state dict in ALBEF's key layout."""
    from trainables.data.synthetic import SyntheticWorld  # local: only needed when pretraining

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    world = SyntheticWorld("train", config.train_images, image_size=config.image_size, seed=config.seed)
    images = world.images.float().div_(255.0)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(directory), max_tokens=config.max_tokens)
    vocab_size = len(tokenizer.tokenizer.get_vocab())
    net = AlbefNet(vit_config(config), bert_config(config, vocab_size), frozenset({"itm"}), config.embed_dim)
    mlm = MlmHead(config.text_width, vocab_size)
    parameters = list(net.parameters()) + list(mlm.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(world) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.1)
    mean, std = torch.tensor(ALBEF_MEAN).view(1, 3, 1, 1), torch.tensor(ALBEF_STD).view(1, 3, 1, 1)
    net.train()
    bar = tqdm(total=total_steps, desc="pretraining tiny-albef (first use only)", disable=not progress, unit="step")
    for _ in range(config.epochs):
        order = torch.randperm(len(world), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            # One random caption of each image per step: all 5 phrasings get seen over the epochs.
            which = torch.randint(0, 5, (len(index),), generator=generator).tolist()
            tokens = tokenizer([world.captions[i][w] for i, w in zip(index.tolist(), which)])
            masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, config.mlm_probability,
                                          vocab_size, generator)
            # A random 1-pixel shift, as tiny-clip's pretraining, so the encoder is not brittle to tiny changes.
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            pixels = (torch.roll(images[index], shifts=shift, dims=(2, 3)) - mean) / std
            terms = albef_losses(net, mlm, pixels, tokens, masked, labels, generator)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                net.temp.clamp_(0.001, 0.5)  # ALBEF's clamp
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
    write_text_files(directory, config)
    started = time.perf_counter()
    state = pretrain(config, directory, progress=progress)
    # Write to a temporary name first so a concurrent reader never sees half a file.
    partial = weights.with_suffix(f".partial-{os.getpid()}")
    save_file(state, str(partial), metadata={"config": json.dumps(asdict(config)), "pretrain_seconds": f"{time.perf_counter() - started:.1f}"})
    os.replace(partial, weights)
    return directory


def load_tiny_albef(spec: str, weights: str | None = None, config: TinyAlbefConfig = TinyAlbefConfig()) -> AlbefVLP:
    """``tiny-albef`` (pretrained and cached on first use), or its architecture with ``weights``."""
    if weights is None:
        directory = ensure_pretrained(config)
        weights = str(directory / WEIGHTS_FILE)
    else:
        directory = model_dir(config)
        write_text_files(directory, config)
    return load_albef(directory, weights, spec)


@torch.no_grad()
def clean_recall(model: AlbefVLP, num_images: int = 500, k_test: int = 16) -> dict[str, dict[str, float]]:
    """Clean TR/IR@K on ``synthetic:test,n=num_images``: ITC only, and the ITC top-``k_test`` re-scored.

    ``itm`` is ALBEF's rule (the raw ITM logit alone, ``Retrieval.py:evaluation``), ``itc+itm``
    BLIP's sum; candidates outside the top-``k_test`` score ``OUTSIDE_TOP_K`` as in ``rerank``.
    """
    from trainables.data.synthetic import SyntheticWorld
    from trainables.evaluation.rerank import OUTSIDE_TOP_K, RerankedScores, itc_similarity, recall_from_scores

    world = SyntheticWorld("test", num_images, image_size=model.image_size, seed=0)
    images = world.images.float().div(255.0)
    captions = [caption for group in world.captions for caption in group]
    text_to_image = torch.arange(num_images).repeat_interleave(len(world.captions[0]))
    image_features = torch.cat([model.encode_image(images[i:i + 100]) for i in range(0, num_images, 100)])
    text_features = torch.cat([model.encode_text(captions[i:i + 500]) for i in range(0, len(captions), 500)])
    similarity = itc_similarity(image_features, text_features)
    tokens = torch.cat([model.image_tokens(images[i:i + 100]) for i in range(0, num_images, 100)])
    i2t = torch.full_like(similarity, OUTSIDE_TOP_K)
    for image in range(num_images):
        top = similarity[image].topk(min(k_test, len(captions))).indices
        i2t[image, top] = model.itm_pair_logits(tokens[image:image + 1].expand(len(top), -1, -1), [captions[t] for t in top.tolist()])
    t2i = torch.full_like(similarity, OUTSIDE_TOP_K)
    for text in range(len(captions)):
        top = similarity[:, text].topk(min(k_test, num_images)).indices
        t2i[top, text] = model.itm_pair_logits(tokens[top], [captions[text]] * len(top))
    summed = [torch.where(m > OUTSIDE_TOP_K, m + similarity, m) for m in (i2t, t2i)]
    return {"itc": recall_from_scores(RerankedScores(similarity, similarity), text_to_image),
            "itm": recall_from_scores(RerankedScores(i2t, t2i), text_to_image),
            "itc+itm": recall_from_scores(RerankedScores(*summed), text_to_image)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached weights exist")
    parser.add_argument("--train-images", type=int, default=TinyAlbefConfig.train_images, help="recipe change (another cache key)")
    parser.add_argument("--epochs", type=int, default=TinyAlbefConfig.epochs, help="recipe change (another cache key)")
    parser.add_argument("--evaluate", type=int, default=0, metavar="N", help="then print clean recall on N synthetic test images")
    args = parser.parse_args()
    config = TinyAlbefConfig(train_images=args.train_images, epochs=args.epochs)
    started = time.perf_counter()
    directory = ensure_pretrained(config, force=args.force)
    print(f"tiny-albef: {directory} ({time.perf_counter() - started:.0f} s)", flush=True)
    if args.evaluate:
        model = load_albef(directory, directory / WEIGHTS_FILE, f"tiny-albef@{directory / WEIGHTS_FILE}")
        for rule, metrics in clean_recall(model, args.evaluate).items():
            print(rule, {key: round(value, 1) for key, value in metrics.items()})


if __name__ == "__main__":
    main()
