"""Visual entailment data (synthetic-ve, snli-ve in ALBEF's format) and the accuracy metric."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import KINDS, load_dataset, parse_data_spec
from trainables.data.entailment import CONTRADICTION, ENTAILMENT, NEUTRAL, EntailmentItem, collate_entailment, only_entailment
from trainables.data.synthetic import COLOURS, POSITION_WORDS, SHAPES, SIZE_WORDS, SyntheticWorld
from trainables.data.synthetic_ve import HIDDEN_CLAUSES
from trainables.errors import UserError
from trainables.evaluation.entailment import entailment_accuracy

# ---- the existing synthetic world is unchanged --------------------------------------------

# sha256 of (image bytes, id, captions) of every item, computed on the code before the
# entailment/grounding additions (commit 357eb9c): the embedded default's data must not move.
_WORLD_HASHES = {
    ("synthetic:test,n=64", 32): "e61c254c8469403c0510c225e9123f3bb52b9e04a958e3317b8f3e0425d43726",
    ("synthetic:train,n=32", 64): "e2ae041f54db3e7370eccaab0c4d77cce38a4e0a95004743a9cfdc28ee17b326",
    ("synthetic:test,n=8,seed=5", 224): "d62cf06a81d9bbf02cf088cb6102ac298cfc23f0cc02a4a242412e5d6e2cc766",
}


@pytest.mark.parametrize("spec,size", list(_WORLD_HASHES))
def test_existing_synthetic_specs_generate_bit_identical_items(spec, size):
    dataset = load_dataset(spec, size)
    digest = hashlib.sha256()
    for index in range(len(dataset)):
        item = dataset[index]
        digest.update(item.image.numpy().tobytes())
        digest.update(json.dumps([item.item_id, list(item.captions)]).encode())
    assert digest.hexdigest() == _WORLD_HASHES[(spec, size)]


# ---- synthetic-ve -------------------------------------------------------------------------

_COUNT_WORDS = {"one": 1, "two": 2, "three": 3}
_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_SHAPE_OF = {**{s: s for s in SHAPES}, **{s + ("es" if s == "cross" else "s"): s for s in SHAPES}}


def _claims(text: str) -> tuple[dict[str, object], bool, bool]:
    """Parse a hypothesis independently of the generator: (attribute claims, plural, has hidden clause)."""
    hidden = any(clause in text for clause in HIDDEN_CLAUSES)
    for clause in HIDDEN_CLAUSES:
        text = text.replace(clause, " ")
    claims: dict[str, object] = {}
    background = re.search(r"on a (\w+) background", text)
    if background:
        claims["background"] = background.group(1)
        text = text.replace(background.group(0), " ")
    for position, phrases in POSITION_WORDS.items():
        for phrase in phrases:
            if phrase in text:
                claims["position"] = position
                text = text.replace(phrase, " ")
    words = text.split()
    plural = words[:2] == ["there", "are"] or any(w.endswith("s") and w not in ("is",) and w in _SHAPE_OF and w not in SHAPES for w in words) \
        or "shapes" in words
    for word in words:
        if word in _COUNT_WORDS:
            claims["count"] = _COUNT_WORDS[word]
        elif word in _SIZE_OF:
            claims["size"] = _SIZE_OF[word]
        elif word in COLOURS:
            claims["colour"] = word
        elif word in _SHAPE_OF:
            claims["shape"] = _SHAPE_OF[word]
    assert claims or hidden or plural or "shape" in words, text
    return claims, plural, hidden


def test_synthetic_ve_labels_follow_the_scenes_ground_truth():
    dataset = load_dataset("synthetic-ve:test,n=300", 32)
    for index in range(len(dataset)):
        item = dataset[index]
        scene = dataset.world.scenes[index // 3]
        claims, plural, hidden = _claims(item.hypothesis)
        false = [name for name, value in claims.items() if getattr(scene, name) != value]
        if item.label == ENTAILMENT:
            assert not false and not hidden and claims, item.hypothesis
            assert plural == (scene.count > 1), item.hypothesis  # grammatical number is true too
        elif item.label == NEUTRAL:
            assert not false and hidden, item.hypothesis
        else:
            assert item.label == CONTRADICTION and len(false) == 1, (item.hypothesis, scene)


def test_synthetic_ve_is_balanced_deterministic_and_a_prefix_of_larger_sets():
    small, large = load_dataset("synthetic-ve:train,n=10,seed=3", 32), load_dataset("synthetic-ve:train,n=31,seed=3", 32)
    assert Counter(large.labels) == {ENTAILMENT: 11, NEUTRAL: 10, CONTRADICTION: 10}
    assert small.hypotheses == large.hypotheses[:10] and small.labels == large.labels[:10]
    assert all(torch.equal(small[i].image, large[i].image) for i in range(10))
    again = load_dataset("synthetic-ve:train,n=10,seed=3", 32)
    assert again.hypotheses == small.hypotheses
    other = load_dataset("synthetic-ve:train,n=10,seed=4", 32)
    assert other.hypotheses != small.hypotheses
    # Every scene gets one hypothesis of each class.
    assert [sorted(large.labels[i:i + 3]) for i in range(0, 30, 3)] == [[0, 1, 2]] * 10


def test_synthetic_ve_premises_are_the_synthetic_world_images():
    pairs = load_dataset("synthetic-ve:test,n=9", 32)
    world = SyntheticWorld("test", 3, image_size=32, seed=0)
    for index in range(9):
        item = pairs[index]
        assert isinstance(item, EntailmentItem) and item.image.dtype == torch.float32
        assert torch.equal(item.image, world[index // 3].image) and item.image_id == world.item_id(index // 3)
    batch = collate_entailment([pairs[0], pairs[1], pairs[2]])
    assert batch.images.shape == (3, 3, 32, 32) and batch.labels.tolist() == [ENTAILMENT, NEUTRAL, CONTRADICTION]


def test_hypothesis_only_reading_cannot_beat_two_thirds():
    dataset = load_dataset("synthetic-ve:test,n=600", 32)
    # The best text-only rule the docs name: a hidden clause -> neutral, else entailment.
    guess = [NEUTRAL if _claims(h)[2] else ENTAILMENT for h in dataset.hypotheses]
    score = entailment_accuracy(guess, dataset.labels)
    assert 0.6 <= score.accuracy <= 0.7


# ---- snli-ve (ALBEF's ve_test.json) -----------------------------------------------------


@pytest.fixture()
def snli_ve(tmp_path):
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    for name, size in (("1000092795", (40, 30)), ("10002456", (20, 50))):
        Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(images / f"{name}.jpg")
    entries = [
        {"image": "1000092795", "sentence": "Two young guys are outside.", "label": "entailment"},
        {"image": "1000092795", "sentence": "Two men are at a wedding.", "label": "neutral"},
        {"image": "10002456", "sentence": "Nobody is at work.", "label": "contradiction"},
        {"image": "10002456.jpg", "sentence": "Workers are working.", "label": 2},
    ]
    path = tmp_path / "ve_test.json"
    path.write_text(json.dumps(entries))
    return path, images, entries


def test_snli_ve_reads_albefs_format(snli_ve):
    path, images, _ = snli_ve
    spec = f"snli-ve:{path},images={images}"
    assert str(parse_data_spec(spec)) == spec and KINDS["snli-ve"].item is EntailmentItem
    dataset = load_dataset(spec, 16)
    assert len(dataset) == 4 and dataset.labels == [2, 1, 0, 2]
    item = dataset[1]
    assert item.hypothesis == "Two men are at a wedding." and item.label == NEUTRAL
    assert item.image_id == "1000092795" and item.item_id == "1000092795#1"
    assert item.image.shape == (3, 16, 16) and 0 <= item.image.min() and item.image.max() <= 1
    # The whole image is squashed, not cropped: a 20x50 image keeps its full height.
    assert dataset[3].image.shape == (3, 16, 16)
    assert [dataset.labels[i] for i in only_entailment(dataset).indices] == [2, 2]


@pytest.mark.parametrize("change,message", [
    (lambda e: [], "lists no pairs"),
    (lambda e: {"a": e}, "not a list"),
    (lambda e: e[:2] + [{**e[2], "label": "maybe"}], "unknown label 'maybe'"),
    (lambda e: e[:2] + [{**e[2], "label": 3}], "unknown label 3"),
    (lambda e: e + [{"image": "404", "sentence": "x", "label": "neutral"}], r"1 of 3 premise images .* do not exist: '.*404\.jpg'"),
    (lambda e: e + [{"image": "1000092795", "label": "neutral"}], "no non-empty string 'sentence'"),
])
def test_snli_ve_bad_files_give_one_clear_error(snli_ve, change, message):
    path, images, entries = snli_ve
    path.write_text(json.dumps(change(entries)))
    with pytest.raises(UserError, match=message):
        load_dataset(f"snli-ve:{path},images={images}", 16)


def test_snli_ve_needs_the_images_folder(snli_ve, tmp_path):
    path, _, _ = snli_ve
    with pytest.raises(UserError, match="missing images="):
        parse_data_spec(f"snli-ve:{path}")
    with pytest.raises(UserError, match="does not exist: pass images="):
        load_dataset(f"snli-ve:{path},images={tmp_path / 'nowhere'}", 16)


def test_synthetic_pairs_exported_in_albef_format_read_back_through_snli_ve(tmp_path):
    pairs = load_dataset("synthetic-ve:test,n=6", 32)
    images = tmp_path / "images"
    images.mkdir()
    for scene in range(2):
        Image.fromarray(pairs.world.images[scene].permute(1, 2, 0).numpy()).save(images / f"{pairs.world.item_id(scene)}.jpg")
    (tmp_path / "ve.json").write_text(json.dumps(pairs.ve_records()))
    read = load_dataset(f"snli-ve:{tmp_path / 've.json'},images={images}", 32)
    assert [(read[i].hypothesis, read[i].label) for i in range(6)] == [(pairs[i].hypothesis, pairs[i].label) for i in range(6)]


# ---- accuracy ------------------------------------------------------------------------------


def test_accuracy_and_per_class_counts_by_hand():
    # labels: E, E, N, C, C ; predictions: E, N, N, E, C -> 3 of 5 right
    labels = [2, 2, 1, 0, 0]
    score = entailment_accuracy([2, 1, 1, 2, 0], labels)
    assert (score.correct, score.total, score.accuracy) == (3, 5, 0.6)
    assert score.per_class["entailment"].__dict__ == {"total": 2, "correct": 1, "predicted": 2}
    assert score.per_class["neutral"].__dict__ == {"total": 1, "correct": 1, "predicted": 2}
    assert score.per_class["contradiction"].__dict__ == {"total": 2, "correct": 1, "predicted": 1}
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 0.1], [3.0, 2.0, 1.0]])
    assert entailment_accuracy(logits, torch.tensor(labels)) == score


@pytest.mark.parametrize("predictions,labels,message", [
    ([0, 1], [0], "must both be"),
    ([], [], "no entailment pairs"),
    ([0, 3], [0, 1], "class indices"),
    (torch.zeros(2, 4), [0, 1], "3 columns"),
])
def test_accuracy_refuses_malformed_input(predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        entailment_accuracy(predictions, labels)
