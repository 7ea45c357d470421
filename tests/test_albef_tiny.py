"""The pieces of ``tiny-albef``'s pretraining (ALBEF's objectives) on a tiny random configuration.

The full pretraining is not run here (minutes); these check what it is made of: the
world's vocabulary covers its captions, BERT's masking leaves [CLS] and padding alone,
and every ALBEF term is finite and reaches every weight that is saved.
"""

from __future__ import annotations

import torch

from trainables.data.synthetic import SyntheticWorld
from trainables.models.albef import AlbefNet
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer
from trainables.models.tiny_albef import (TinyAlbefConfig, MlmHead, _mask_tokens, albef_losses, bert_config, model_dir,
                                          vit_config, write_text_files)

SMALL = TinyAlbefConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1, fusion_layers=1, embed_dim=8)


def test_the_world_vocabulary_covers_every_caption(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path), max_tokens=SMALL.max_tokens)
    captions = [caption for split in ("train", "test") for item in SyntheticWorld(split, 40, seed=3) for caption in item.captions]
    ids = tokenizer(captions)["input_ids"]
    assert tokenizer.tokenizer.unk_token_id not in ids
    assert ids.shape[1] <= SMALL.max_tokens


def test_masking_never_touches_cls_or_padding(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path))
    tokens = tokenizer(["two red stars at the top over a white background", "a cross"])
    masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, 0.9, 80, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[tokens["attention_mask"] == 0].any()
    assert chosen.any() and torch.equal(labels[chosen], tokens["input_ids"][chosen])
    assert torch.equal(masked[~chosen], tokens["input_ids"][~chosen])


def test_every_albef_term_is_finite_and_trains_every_saved_weight(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path))
    vocab_size = len(tokenizer.tokenizer.get_vocab())
    net = AlbefNet(vit_config(SMALL), bert_config(SMALL, vocab_size), frozenset({"itm"}), SMALL.embed_dim)
    mlm = MlmHead(SMALL.text_width, vocab_size)
    world = SyntheticWorld("train", 4, seed=0)
    tokens = tokenizer([item.captions[0] for item in world])
    masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, 0.5, vocab_size, torch.Generator().manual_seed(1))
    terms = albef_losses(net, mlm, torch.stack([item.image for item in world]), tokens, masked, labels, torch.Generator().manual_seed(2))
    assert set(terms) == {"loss", "itc", "itm", "mlm"} and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    silent = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == [], silent  # ITC, ITM (fusion + head) and MLM together reach every saved weight


def test_the_cache_is_content_addressed():
    assert model_dir(SMALL) != model_dir(TinyAlbefConfig()) and model_dir(SMALL) == model_dir(TinyAlbefConfig(**vars(SMALL)))
