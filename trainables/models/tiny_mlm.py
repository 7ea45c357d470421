"""``tiny-mlm``: the embedded masked language model, a small BERT pretrained on the synthetic world's captions.

BERT-Attack (inside SGA and Co-attack) proposes replacement words from a masked
LM; the papers use ``bert-base-uncased``, which the platform may not download. So
the embedded default gets its own: a ``transformers.BertForMaskedLM`` with a tiny
configuration and random initialisation, a **word-level** vocabulary built here
from the synthetic world's train captions (one token per word, ``BertTokenizer``'s
basic splitting on whitespace and punctuation, so ``"tiny;"`` is ``tiny`` + ``;``),
pretrained with BERT's masking recipe (15% of the tokens; of those 80% ``[MASK]``,
10% a random word, 10% unchanged) on every train caption.

Nothing is downloaded. The first use pretrains it (a progress bar, about a minute
on two idle cores) and caches it as a Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) under ``$MAVA_CACHE_DIR`` (default
``~/.cache/mava-platform``), named ``tiny-mlm-<key>``; the key hashes the
configuration *and* the caption corpus, so a change of either gives a new folder.
Because it is an ordinary masked-LM folder, the word source is the same
:class:`~trainables.attacks.text_candidates.MaskedLMCandidates` that reads a local
``bert-base-uncased``. Regenerate with ``python -m trainables.models.tiny_mlm --force``.

It knows only the synthetic world's ~80 words: on other data every unknown word is
``[UNK]`` to it, so real captions need a real MLM (``word_candidates: mlm:/abs/dir``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from trainables.models.tiny_clip import cache_dir, first_use_lock

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class TinyMlmConfig:
    """Architecture and pretraining recipe; any change gives a new cache key."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 24  # tokens; the world's longest caption is 22 with [CLS] and [SEP]
    train_images: int = 5000  # x 5 captions each, as tiny-clip's pretraining set
    epochs: int = 3
    batch_size: int = 128  # captions per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    mask_probability: float = 0.15  # BERT: 15% of tokens are prediction targets
    seed: int = 0

    def cache_key(self, corpus: list[str]) -> str:
        """Hash of this configuration and of the captions it is trained on."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        digest.update("\n".join(corpus).encode())
        return digest.hexdigest()[:12]


def train_captions(config: TinyMlmConfig = TinyMlmConfig()) -> list[str]:
    """Every caption of the synthetic world's first ``train_images`` train scenes (no image is rendered)."""
    from trainables.data.synthetic import describe, sample_scenes  # local: only needed to build or find the MLM

    return [caption for scene in sample_scenes("train", config.train_images, config.seed) for caption in describe(scene)]


def build_vocabulary(captions: list[str]):
    """A ``BertTokenizer`` whose vocabulary is the special tokens plus every word of ``captions`` (sorted)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer  # BERT's own whitespace/punctuation split
    from transformers import BertTokenizer

    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = sorted({word for caption in captions for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(caption))})
    vocabulary = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    return BertTokenizer(vocab=vocabulary, do_lower_case=True)


def build_tiny_mlm(config: TinyMlmConfig, vocab_size: int):
    """The tiny architecture with random weights (an ordinary ``BertForMaskedLM``)."""
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions, type_vocab_size=1, pad_token_id=0))


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, first_word_id: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (masked inputs, labels with -100 everywhere but the chosen positions).

    ``special`` (same shape) marks [CLS]/[SEP]/[PAD], never chosen. Of the chosen tokens
    80% become [MASK], 10% a random *word* (never a special token), 10% stay unchanged.
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = torch.randint(first_word_id, vocab_size, (int(swap.sum()),), generator=generator)
    return masked, labels


def pretrain(config: TinyMlmConfig, captions: list[str], tokenizer, progress: bool = True):
    """Masked-LM pretraining on ``captions``; returns the trained ``BertForMaskedLM`` (eval mode)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    # One intra-op thread: the matrices are too small to split, and on a busy machine extra
    # threads spin-wait (measured: 3.3 s/step with two threads vs 0.75 s with one, machine loaded).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain_loop(config, captions, tokenizer, generator, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain_loop(config: TinyMlmConfig, captions: list[str], tokenizer, generator: torch.Generator, progress: bool):
    encoded = tokenizer(captions, padding="max_length", truncation=True, max_length=config.max_positions, return_tensors="pt")
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"]
    special = torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))
    model = build_tiny_mlm(config, len(tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(captions) // config.batch_size
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.1)
    bar = tqdm(total=total, desc="pretraining tiny-mlm (first use only)", disable=not progress, unit="step")
    for _ in range(config.epochs):
        order = torch.randperm(len(captions), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            masked, labels = mask_tokens(input_ids[index], special[index], tokenizer.mask_token_id, len(tokenizer),
                                         len(SPECIAL_TOKENS), config.mask_probability, generator)
            loss = model(input_ids=masked, attention_mask=attention[index], labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def cached_mlm_path(config: TinyMlmConfig = TinyMlmConfig(), captions: list[str] | None = None) -> Path:
    """The folder the MLM of ``config`` is (or will be) cached in."""
    corpus = captions if captions is not None else train_captions(config)
    return cache_dir() / f"tiny-mlm-{config.cache_key(corpus)}"


def ensure_tiny_mlm(config: TinyMlmConfig = TinyMlmConfig(), force: bool = False, progress: bool = True) -> Path:
    """The cached MLM folder, pretraining it first if it is not cached yet."""
    captions = train_captions(config)
    path = cached_mlm_path(config, captions)
    if (path / "config.json").is_file() and not force:
        return path
    with first_use_lock(path, "tiny-mlm"):
        if (path / "config.json").is_file() and not force:  # made while this process waited for the lock
            return path
        started = time.perf_counter()
        tokenizer = build_vocabulary(captions)
        model = pretrain(config, captions, tokenizer, progress=progress)
        # Write a private folder, then rename it into place: a reader never sees half a model.
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(str(partial))  # model.safetensors + config.json
        tokenizer.save_pretrained(str(partial))
        (partial / "tiny_mlm.json").write_text(json.dumps(
            {"config": asdict(config), "pretrain_seconds": round(time.perf_counter() - started, 1)}, indent=2))
        if force and path.exists():
            shutil.rmtree(path)
        os.rename(partial, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="pretrain again even if a cached MLM exists")
    args = parser.parse_args()
    started = time.perf_counter()
    path = ensure_tiny_mlm(force=args.force)
    print(f"tiny-mlm: {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
