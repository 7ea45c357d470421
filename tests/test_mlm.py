"""The embedded masked LM (``tiny-mlm``) and the text attacks' word-candidate sources.

BERT-Attack inside SGA and Co-attack proposes words from a masked LM; the embedded
default pretrains its own on the synthetic world's captions. Most tests use a tiny
MLM pretrained in seconds into a temporary cache; one ``slow`` test uses the real
cached default.
"""

from __future__ import annotations

import pytest
import torch

from trainables.attacks import get_attack
from trainables.attacks.text_attack import is_substitutable
from trainables.attacks.text_candidates import MaskedLMCandidates
from trainables.attacks.word_candidates import candidate_source, check_word_candidates
from trainables.config import TrainConfig, train_config_from
from trainables.errors import UserError
from trainables.evaluation.robustness import EvalSettings, evaluate_retrieval
from trainables.models.tiny_mlm import (SPECIAL_TOKENS, TinyMlmConfig, build_vocabulary, ensure_tiny_mlm, mask_tokens,
                                        train_captions)
from trainables.names import metric_name

# Seconds to pretrain on a loaded CPU: one layer of width 32, 2 epochs of 1,000 captions.
FAST_MLM = TinyMlmConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, train_images=200, epochs=2, batch_size=64)
CAPTIONS = ["one small green star in the center over a brown background",
            "there are 3 red circles in the left-hand area and they are huge; the background is white"]


@pytest.fixture(scope="module")
def fast_mlm(tmp_path_factory) -> MaskedLMCandidates:
    """A masked-LM source over a tiny MLM pretrained (seconds) into a private cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAVA_CACHE_DIR", str(tmp_path_factory.mktemp("mlm-cache")))
        folder = ensure_tiny_mlm(FAST_MLM, progress=False)
    return MaskedLMCandidates(folder)


def _words(source: MaskedLMCandidates) -> set[str]:
    return set(source.tokenizer.get_vocab()) - set(SPECIAL_TOKENS)


def test_the_vocabulary_is_the_worlds_words_one_token_each():
    captions = train_captions(FAST_MLM)
    tokenizer = build_vocabulary(captions)
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    for caption in captions[:50]:
        tokens = tokenizer.tokenize(caption)
        assert "[UNK]" not in tokens and all(not token.startswith("##") for token in tokens)
    assert tokenizer.tokenize("tiny; dog") == ["tiny", ";", "[UNK]"]  # punctuation split off; unknown word -> [UNK]


def test_masking_follows_berts_recipe():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 80, (400, 50), generator=generator)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True  # [CLS] column: never a target
    masked, labels = mask_tokens(ids, special, mask_id=4, vocab_size=80, first_word_id=5, probability=0.15,
                                 generator=generator)
    chosen = labels != -100
    assert not chosen[:, 0].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # only targets are touched
    share = chosen.float().mean().item() * 50 / 49
    assert 0.13 < share < 0.17
    as_mask = (masked[chosen] == 4).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.77 < as_mask < 0.83 and 0.07 < unchanged < 0.14  # 80% [MASK]; 10% kept (+ random hits of itself)
    assert (masked[chosen] >= 4).all()  # random replacements are words, never [PAD]/[UNK]/[CLS]/[SEP]


def test_the_mlm_is_cached_content_addressed(tmp_path, monkeypatch):
    monkeypatch.setenv("MAVA_CACHE_DIR", str(tmp_path))
    first = ensure_tiny_mlm(FAST_MLM, progress=False)
    assert first.parent == tmp_path and first.name.startswith("tiny-mlm-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in first.iterdir()}
    written = (first / "model.safetensors").stat().st_mtime_ns

    def no_pretraining(*args, **kwargs):
        raise AssertionError("a cached MLM was pretrained again")

    monkeypatch.setattr("trainables.models.tiny_mlm.pretrain", no_pretraining)
    assert ensure_tiny_mlm(FAST_MLM, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    # A different recipe, or a different caption corpus, names a different folder.
    assert FAST_MLM.cache_key(train_captions(FAST_MLM)) != TinyMlmConfig(seed=1).cache_key(train_captions(FAST_MLM))
    assert FAST_MLM.cache_key(["a red circle"]) != FAST_MLM.cache_key(["a blue circle"])


def test_the_mlm_source_proposes_in_vocabulary_words_other_than_the_original(fast_mlm):
    sentences = [caption.split(" ") for caption in CAPTIONS]
    proposals = fast_mlm.propose(sentences, torch.Generator())
    vocabulary = _words(fast_mlm)
    for words, per_word in zip(sentences, proposals):
        assert len(per_word) == len(words)
        for word, candidates in zip(words, per_word):
            assert set(candidates) <= vocabulary, (word, candidates)
            if is_substitutable(word) and "-" not in word:  # "left-hand" is three tokens: BERT-Attack's combinations
                assert any(candidate != word.strip(";") for candidate in candidates), (word, candidates)


@pytest.mark.parametrize("attack", ["sga", "co-attack"])
def test_text_attacks_with_the_mlm_change_words_and_lower_recall(attack, fast_mlm, pretrained_tiny_clip, synthetic_test_set):
    images = torch.stack([synthetic_test_set[i].image for i in range(4)])
    captions = [synthetic_test_set[i].captions for i in range(4)]
    output = get_attack(attack)(pretrained_tiny_clip, images, captions, 2 / 255, torch.Generator().manual_seed(0),
                                candidates=fast_mlm)
    assert output.text_source == fast_mlm.name
    vocabulary = _words(fast_mlm)
    changed = 0
    for before, after in zip((c for g in captions for c in g), (c for g in output.captions for c in g)):
        swapped = [(old, new) for old, new in zip(before.split(" "), after.split(" ")) if old != new]
        assert len(swapped) <= 1 and all(new.strip(";") in vocabulary for _, new in swapped)
        changed += len(swapped)
    assert changed > 0
    settings = EvalSettings(attacks=(attack,), eps=(2 / 255,), batch_size=16, max_images=16,
                            text_candidates=f"mlm:{fast_mlm.name.removeprefix('mlm:')}")
    metrics = evaluate_retrieval(pretrained_tiny_clip, synthetic_test_set, settings)
    for key in ("tr1", "ir1"):
        assert metrics[metric_name(attack, 2 / 255, key)] < metrics[metric_name("clean", None, key)], (key, metrics)


def test_per_epoch_evaluation_uses_the_configured_source(fast_mlm, random_tiny_clip, synthetic_test_set, monkeypatch):
    from trainables.attacks import word_candidates
    from trainables.train import evaluate_model

    asked = []
    real = word_candidates.candidate_source
    monkeypatch.setattr(word_candidates, "candidate_source", lambda spec, *args: asked.append(spec) or real(spec, *args))
    spec = f"mlm:{fast_mlm.name.removeprefix('mlm:')}"
    config = TrainConfig(eval_attacks=("co-attack",), eval_eps=(2 / 255,), word_candidates=spec)
    evaluate_model(random_tiny_clip, torch.utils.data.Subset(synthetic_test_set, range(4)), config)
    assert asked == [spec]
    assert TrainConfig().word_candidates == "tiny-mlm"  # the embedded default's source
    assert TrainConfig().model_dump(mode="json")["word_candidates"] == "tiny-mlm"  # what MLflow records as a param


@pytest.mark.parametrize(("spec", "message"), [
    ("bert", r"unknown word-candidate source 'bert': use tiny-mlm, offline or mlm:/absolute"),
    ("mlm:models/bert", r"the masked-LM folder must be an absolute path"),
])
def test_a_bad_word_candidate_source_is_one_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        check_word_candidates(spec)
    with pytest.raises(UserError, match=f"key 'word_candidates': .*{message}"):
        train_config_from({"word_candidates": spec})
    with pytest.raises(UserError, match=message):
        candidate_source(spec, None)


def test_the_embedded_mlm_is_refused_for_text_attacks_on_real_captions():
    with pytest.raises(UserError, match=r"knows only the synthetic world's words.*mlm:/absolute/folder.*'offline'"):
        train_config_from({"eval_data": "karpathy:/data/f30k.json,images=/data/f30k,split=test", "eval_attacks": "pgd,sga"})
    train_config_from({"eval_data": "karpathy:/data/f30k.json,images=/data/f30k,split=test", "eval_attacks": "pgd"})


@pytest.mark.slow
def test_the_embedded_mlm_proposes_words_of_the_same_kind(pretrained_tiny_clip):
    # Pretrains the default tiny-mlm on first use (about 1-2 min of CPU), then loads the cache.
    source = candidate_source("tiny-mlm", pretrained_tiny_clip)
    assert source.name.startswith("tiny-mlm:")
    words = "one small green star in the center over a brown background".split(" ")
    proposals = dict(zip(words, source.propose([words], torch.Generator())[0]))
    colours, shapes = {"red", "yellow", "blue", "orange", "purple"}, {"circle", "square", "triangle", "cross"}
    # The MLM learnt the world's word classes: a colour's alternatives are colours, a shape's are shapes.
    assert len(colours & set(proposals["green"])) >= 3 and len(shapes & set(proposals["star"])) >= 3
    assert len({"white", "black", "gray"} & set(proposals["brown"])) >= 2
