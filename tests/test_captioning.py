"""Captioning metrics (pycocoevalcap, offline) and the cross-task transfer evaluation of Table 8."""

from __future__ import annotations

import pytest
from transformers import BlipForConditionalGeneration

from tests.test_real_models import write_blip_dir
from trainables.data.synthetic import SyntheticWorld
from trainables.errors import UserError
from trainables.evaluation import captioning
from trainables.evaluation.captioning import CAPTION_KEYS, CaptionEvalSettings, caption_metrics, caption_metrics_for_runs, evaluate_captioning
from trainables.models import load_model

REFERENCES = {
    "img1": ["A man is riding a horse on the beach.", "A person rides a brown horse along the shore."],
    "img2": ["Two dogs play with a ball in the grass.", "Dogs playing in a green field."],
    "img3": ["A plate of food on a wooden table.", "Some food served on a plate."],
}
IDENTICAL = {key: [captions[0]] for key, captions in REFERENCES.items()}
UNRELATED = {"img1": ["a red car parked in the street"], "img2": ["an airplane flying over the city"], "img3": ["a cat sleeping"]}


def test_identical_captions_score_the_maximum_and_unrelated_ones_score_lower():
    scores = caption_metrics_for_runs(REFERENCES, {"identical": IDENTICAL, "unrelated": UNRELATED})
    identical, unrelated = scores["identical"], scores["unrelated"]
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert identical[key] == pytest.approx(100.0, abs=1e-4)  # x100, as BLIP and the paper report
    assert identical["meteor"] == pytest.approx(100.0)  # Java is installed here
    for key in ("bleu1", "bleu4", "meteor", "rouge_l", "cider"):
        assert unrelated[key] < identical[key]
    assert identical["cider"] > 100.0 > unrelated["cider"]


def test_spice_is_reported_unavailable_offline_instead_of_downloading(monkeypatch):
    monkeypatch.setattr(captioning, "_spice_jars_missing", lambda: ["stanford-corenlp-3.6.0.jar"])
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)  # also: no Java (fast, and METEOR's fallback)
    scores = caption_metrics(REFERENCES, IDENTICAL)
    assert scores["spice"] is None and scores["meteor"] is None
    assert any(note.startswith("SPICE unavailable offline") for note in scores["notes"])
    assert any(note.startswith("METEOR unavailable: Java not found") for note in scores["notes"])
    assert scores["bleu1"] == pytest.approx(100.0, abs=1e-4)  # the pure-Python metrics still run


def test_mismatched_ids_or_several_hypotheses_are_refused():
    with pytest.raises(ValueError, match="different ids"):
        caption_metrics(REFERENCES, {"img1": ["a man"]})
    with pytest.raises(ValueError, match="exactly one"):
        caption_metrics(REFERENCES, IDENTICAL | {"img1": ["a man", "a horse"]})


@pytest.fixture(scope="module")
def blip_captioner(tmp_path_factory):
    return load_model(f"hf-blip-cap:{write_blip_dir(tmp_path_factory.mktemp('blip') / 'cap', BlipForConditionalGeneration)}")


def test_captioning_is_scored_clean_and_under_a_transfer_attack_from_a_retrieval_surrogate(blip_captioner, random_tiny_clip):
    world = SyntheticWorld("test", 3, image_size=32, seed=0)
    settings = CaptionEvalSettings(eps=(2 / 255,), batch_size=2, max_length=8, min_length=1, num_beams=1)
    result = evaluate_captioning(blip_captioner, world, attack="pgd", surrogate=random_tiny_clip, settings=settings)
    assert result.threat_model == f"transfer:{random_tiny_clip.spec}"
    for key in CAPTION_KEYS:
        if key != "spice":
            assert f"clean/{key}" in result.metrics and f"pgd/eps2/{key}" in result.metrics
    assert all(value >= 0.0 for value in result.metrics.values())
    assert any("SPICE" in note for note in result.notes)


def test_an_attack_needs_a_retrieval_surrogate(blip_captioner):
    with pytest.raises(UserError, match="needs a surrogate retrieval model"):
        evaluate_captioning(blip_captioner, SyntheticWorld("test", 1, image_size=32), attack="pgd")
    with pytest.raises(UserError, match="no text encoder"):
        blip_captioner.encode_text(["a caption"])


def test_the_captioning_command_scores_clean_and_transfer_and_writes_json(tmp_path, random_tiny_clip_weights):
    from platform.evaluate_captions import main

    captioner = write_blip_dir(tmp_path / "cap", BlipForConditionalGeneration)
    output = tmp_path / "captions.json"
    assert main(["--model", f"hf-blip-cap:{captioner}", "--data", "synthetic:test,n=2", "--attack", "pgd", "--eps", "2/255",
                 "--surrogate", f"tiny-clip@{random_tiny_clip_weights}", "--num-beams", "1", "--max-length", "8",
                 "--min-length", "1", "--output", str(output), "--no-progress"]) == 0
    result = __import__("json").loads(output.read_text())
    assert result["threat"] == f"transfer:tiny-clip@{random_tiny_clip_weights}"
    assert {"clean/cider", "clean/bleu4", "pgd/eps2/cider", "pgd/eps2/meteor"} <= set(result["metrics"])
    assert any("SPICE" in note for note in result["notes"])


@pytest.mark.parametrize("arguments, message", [
    (["--attack", "pgd"], "needs --surrogate"),
    (["--surrogate", "tiny-clip"], "without --attack"),
])
def test_the_captioning_command_refuses_an_attack_without_a_surrogate_and_vice_versa(tmp_path, arguments, message):
    from platform.evaluate_captions import main

    with pytest.raises(UserError, match=message):
        main(["--model", f"hf-blip-cap:{tmp_path}", "--data", "synthetic:test,n=2", *arguments])


def test_the_captioning_command_refuses_a_retrieval_model():
    from platform.evaluate_captions import main

    with pytest.raises(UserError, match="not a captioning model"):
        main(["--model", "tiny-clip", "--data", "synthetic:test,n=2"])
