"""The evaluation attacks do what their papers claim, keep the contract, and evaluation stays honest.

Claims tested, for every entry of ``ATTACKS``: it lowers TR@1 and IR@1 of the undefended
tiny CLIP at eps 2/255 and 4/255; its images stay in the eps-ball and in [0, 1]; the
model's weights, train/eval mode and gradients are untouched; the same seed gives the
same output (these contract tests run on a random tiny CLIP and a random tiny ALBEF, as
target and as transfer surrogate). The word-substitution attack changes at most its budget of words and
leaves a caption alone when nothing helps; more PGD/APGD steps never weaken the attack;
transfer evaluation never differentiates the target; the honesty checks fire on a
gradient-masked model and stay quiet on an honest one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from torch import nn

from albef_fakes import write_tiny_albef

from trainables.attacks import ATTACKS, TEXT_ATTACKS, get_attack
from trainables.attacks.apgd import APGDSettings, apgd, apgd_retrieval_attack, checkpoints
from trainables.attacks.base import caption_centroids, retrieval_loss
from trainables.attacks.pgd_retrieval import pgd_retrieval_attack
from trainables.attacks.sga import scaled_copies
from trainables.attacks.text_attack import TextAttackSettings, embedding_kl, encode_texts, text_attack
from trainables.attacks.text_candidates import MaskedLMCandidates, OfflineCandidates, char_edits
from trainables.errors import UserError
from trainables.evaluation.robustness import (EvalSettings, RetrievalRow, attach_row_warnings, evaluate_retrieval,
                                              evaluate_retrieval_rows, honesty_checks)
from trainables.models import load_model
from trainables.names import metric_name

ALL_ATTACKS = sorted(ATTACKS)
# Few steps where the property does not depend on the attack's strength.
FAST = {"steps": 2}


def _batch(dataset, count: int, start: int = 0):
    items = [dataset[i] for i in range(start, start + count)]
    return torch.stack([item.image for item in items]), [item.captions for item in items]


# The contract holds for every model family: the attacks reach a model only through
# ``encode_image``/``encode_text``, so one test body serves the dual encoder and the fusion model.
# Each kind names the word source its text attacks fall back to offline (ALBEF has no open_clip
# token embedding, so only character edits).
MODEL_KINDS = {"tiny-clip": "offline:char+token-embedding", "albef": "offline:char"}


@pytest.fixture(scope="module", params=sorted(MODEL_KINDS))
def contract_spec(request, random_tiny_clip_weights, tmp_path_factory) -> tuple[str, str]:
    """(model spec, expected offline word source) of a random tiny model of each kind."""
    if request.param == "albef":
        text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("albef-attacks"))
        return f"albef:{text_dir}@{checkpoint}", MODEL_KINDS["albef"]
    return f"tiny-clip@{random_tiny_clip_weights}", MODEL_KINDS["tiny-clip"]


@pytest.fixture(scope="module")
def contract_model(contract_spec):
    """One model per kind shared by the property tests (hypothesis needs no per-example fixture)."""
    return load_model(contract_spec[0])


# ---- the papers' claim: attacks work on an undefended model --------------------------------


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_every_attack_lowers_recall_of_the_undefended_model(name, pretrained_tiny_clip, synthetic_test_set):
    # The paper's smaller budget: an attack that lowers recall at 2/255 is not a 4/255 artefact.
    settings = EvalSettings(attacks=(name,), eps=(2 / 255,), batch_size=32, max_images=32)
    metrics = evaluate_retrieval(pretrained_tiny_clip, synthetic_test_set, settings)
    for eps in settings.eps:
        for key in ("tr1", "ir1"):
            assert metrics[metric_name(name, eps, key)] < metrics[metric_name("clean", None, key)], (name, eps, key, metrics)


# ---- contract: eps-ball, pixel range, model untouched, determinism -------------------------


@pytest.mark.parametrize("name", ALL_ATTACKS)
@hypothesis_settings(max_examples=3, deadline=None)
@given(eps=st.floats(0.5 / 255, 16 / 255), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_adversarial_images_stay_in_the_eps_ball_and_pixel_range(name, contract_model, contract_spec, synthetic_test_set,
                                                                 eps, batch, seed):
    images, captions = _batch(synthetic_test_set, batch, start=seed % 50)
    output = get_attack(name)(contract_model, images, captions, eps, torch.Generator().manual_seed(seed), **FAST)
    assert output.images.shape == images.shape and output.images.dtype == images.dtype
    assert (output.images - images).abs().max().item() <= eps
    assert output.images.min().item() >= 0.0 and output.images.max().item() <= 1.0
    if name in TEXT_ATTACKS:
        assert [len(group) for group in output.captions] == [len(group) for group in captions]
        assert output.text_source == contract_spec[1]
    else:
        assert output.captions is None and output.text_source is None


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_attacks_leave_weights_mode_and_gradients_untouched(name, contract_spec, synthetic_test_set):
    model = load_model(contract_spec[0])  # a private copy: the test trains and flags it
    images, captions = _batch(synthetic_test_set, 3)
    model.train()
    model.vision.requires_grad_(True)  # as during fine-tuning
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modes = {name_: module.training for name_, module in model.named_modules()}
    flags = {name_: p.requires_grad for name_, p in model.named_parameters()}
    get_attack(name)(model, images, captions, 4 / 255, torch.Generator().manual_seed(0), **FAST)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert modes == {name_: module.training for name_, module in model.named_modules()}
    assert flags == {name_: p.requires_grad for name_, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_the_same_seed_gives_the_same_attack(name, contract_model, synthetic_test_set):
    images, captions = _batch(synthetic_test_set, 3)
    runs = [get_attack(name)(contract_model, images, captions, 4 / 255, torch.Generator().manual_seed(seed), **FAST)
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].captions == runs[1].captions
    assert not torch.equal(runs[0].images, runs[2].images)


# ---- the word-substitution attack ------------------------------------------------------------


def _changed_words(original: str, adversarial: str) -> int:
    before, after = original.split(" "), adversarial.split(" ")
    assert len(before) == len(after)  # a substitution replaces a word's core, never splits or joins words
    return sum(a != b for a, b in zip(before, after))


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_text_attack_changes_at_most_its_budget_of_words(budget, pretrained_tiny_clip, synthetic_test_set):
    captions = [caption for i in range(3) for caption in synthetic_test_set[i].captions[:2]]
    original = encode_texts(pretrained_tiny_clip, captions, 64)

    def objective(features, index):
        return embedding_kl(original[index], features)

    adversarial = text_attack(pretrained_tiny_clip, captions, objective, OfflineCandidates(pretrained_tiny_clip),
                              torch.Generator().manual_seed(0), TextAttackSettings(budget=budget))
    changed = [_changed_words(a, b) for a, b in zip(captions, adversarial)]
    assert max(changed) <= budget
    if budget == 0:
        assert adversarial == captions
    else:
        assert min(changed) >= 1  # any substitution moves the embedding, so the KL objective always improves
        # every kept substitution raised the objective
        gain = objective(encode_texts(pretrained_tiny_clip, adversarial, 64), torch.arange(len(captions)))
        assert bool((gain > 0).all())


def test_text_attack_returns_the_original_where_no_candidate_helps(pretrained_tiny_clip, synthetic_test_set):
    captions = list(synthetic_test_set[0].captions)
    constant = text_attack(pretrained_tiny_clip, captions, lambda features, index: torch.zeros(len(features)),
                           OfflineCandidates(pretrained_tiny_clip), torch.Generator().manual_seed(0))
    assert constant == captions
    # an objective maximised by the original caption itself: cosine to its own embedding
    original = F.normalize(encode_texts(pretrained_tiny_clip, captions, 64), dim=-1)
    faithful = text_attack(pretrained_tiny_clip, captions,
                           lambda features, index: (F.normalize(features, dim=-1) * original[index]).sum(-1),
                           OfflineCandidates(pretrained_tiny_clip), torch.Generator().manual_seed(0))
    assert faithful == captions


def test_text_attack_similarity_constraint_rejects_far_candidates(pretrained_tiny_clip, synthetic_test_set):
    captions = list(synthetic_test_set[1].captions)
    original = encode_texts(pretrained_tiny_clip, captions, 64)
    adversarial = text_attack(pretrained_tiny_clip, captions, lambda f, i: embedding_kl(original[i], f),
                              OfflineCandidates(pretrained_tiny_clip), torch.Generator().manual_seed(0),
                              TextAttackSettings(min_cosine=1.0 + 1e-6))  # no candidate can be that similar
    assert adversarial == captions


def test_offline_candidates_are_one_edit_words_and_token_embedding_neighbours(pretrained_tiny_clip):
    source = OfflineCandidates(pretrained_tiny_clip, char_candidates=5, neighbour_candidates=5)
    proposals = source.propose([["three", "red;", "left-hand"]], torch.Generator().manual_seed(0))[0]
    edits = set(char_edits("three"))
    assert set(proposals[0][:5]) <= edits and len(proposals[0]) == 10
    assert proposals[0][5:] == source.neighbours("three") and "three" not in proposals[0]
    assert "red" not in proposals[1] and set(proposals[1][:5]) <= set(char_edits("red"))
    assert source.neighbours("left-hand") == []  # several BPE tokens: no single embedding


def _tiny_masked_lm(directory):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "on", "red", "blue", "green", "yellow",
                  "circle", "square", "star", "left", "right", "big", "small", "white", "black", "background", "##s"]
    (directory / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    BertForMaskedLM(config).save_pretrained(str(directory))
    return vocabulary


def test_text_attack_with_a_local_masked_lm(tmp_path, pretrained_tiny_clip):
    vocabulary = _tiny_masked_lm(tmp_path)
    source = MaskedLMCandidates(tmp_path, top_k=10, logit_threshold=-1e9)  # random weights: keep every prediction
    assert source.name == f"mlm:{tmp_path.resolve()}"
    captions = ["a red circle on the left", "a big blue square on a white background"]
    proposals = source.propose([caption.split(" ") for caption in captions], torch.Generator())
    words = {word for sentence in proposals for candidates in sentence for word in candidates}
    assert words and words <= set(vocabulary) - {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "##s"}
    original = encode_texts(pretrained_tiny_clip, captions, 64)
    adversarial = text_attack(pretrained_tiny_clip, captions, lambda f, i: embedding_kl(original[i], f), source,
                              torch.Generator().manual_seed(0))
    assert all(_changed_words(a, b) <= 1 for a, b in zip(captions, adversarial))
    for before, after in zip(captions, adversarial):
        changed = [w for v, w in zip(before.split(" "), after.split(" ")) if v != w]
        assert set(changed) <= set(vocabulary)
    output = get_attack("sga")(pretrained_tiny_clip, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                               [(captions[0],), (captions[1],)], 2 / 255, torch.Generator().manual_seed(0),
                               steps=1, candidates=source)
    assert output.text_source == source.name


def test_a_missing_masked_lm_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        MaskedLMCandidates(tmp_path / "no-such-model")


# ---- APGD and PGD: schedule, best point, more steps -------------------------------------------


def test_apgd_checkpoints_follow_the_paper():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): AutoAttack's schedule for N = 100
    assert checkpoints(APGDSettings(steps=100)) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_reaches_the_corner_of_a_linear_objective():
    images = torch.full((2, 3, 4, 4), 0.5)
    weight = torch.randn(48, generator=torch.Generator().manual_seed(0))
    objective = lambda x: (x.flatten(1) * weight).sum(dim=1)  # noqa: E731
    adversarial = apgd(objective, images, APGDSettings(eps=4 / 255, steps=20), torch.Generator().manual_seed(0))
    best = objective(images + 4 / 255 * weight.sign().view(1, 3, 4, 4))
    assert torch.allclose(objective(adversarial), best, atol=1e-5)


def _mean_loss(model, images, captions, adversarial) -> float:
    with torch.no_grad():
        return float(retrieval_loss(model.encode_image(adversarial), caption_centroids(model, captions)).mean())


@pytest.mark.parametrize("attack", [pgd_retrieval_attack, apgd_retrieval_attack])
def test_more_steps_never_weaken_pgd_or_apgd(attack, pretrained_tiny_clip, synthetic_test_set):
    images, captions = _batch(synthetic_test_set, 16)
    losses = [_mean_loss(pretrained_tiny_clip, images, captions,
                         attack(pretrained_tiny_clip, images, captions, 2 / 255, torch.Generator().manual_seed(0), steps=steps).images)
              for steps in (3, 10, 30)]
    clean = _mean_loss(pretrained_tiny_clip, images, captions, images)
    assert losses[0] > clean
    assert losses[1] >= losses[0] - 0.005 and losses[2] >= losses[1] - 0.005, losses


def test_sga_scaled_copies_keep_the_image_shape():
    images = torch.rand(2, 3, 32, 32)
    copies = scaled_copies(images, (0.5, 0.75, 1.25, 1.5), 0.05, torch.Generator().manual_seed(0))
    assert copies.shape == (10, 3, 32, 32) and torch.equal(copies[:2], images)


# ---- transfer: only the surrogate's gradients ------------------------------------------------


def test_transfer_evaluation_never_differentiates_the_target(tiny_clip, contract_model, synthetic_test_set):
    # Every model kind serves as surrogate: ALBEF is the paper's surrogate of every transfer table.
    target, surrogate = tiny_clip, contract_model
    target.vision.requires_grad_(True)
    graded_forwards, scored_inputs = [], []

    def record(module, inputs, output):
        graded_forwards.append(output.requires_grad)
        scored_inputs.append(inputs[0].detach().clone())

    hook = target.vision.register_forward_hook(record)
    try:
        rows = evaluate_retrieval_rows(target, synthetic_test_set, EvalSettings(attacks=("pgd", "sga"), eps=(4 / 255,), max_images=6),
                                       surrogate=surrogate)
    finally:
        hook.remove()
    assert graded_forwards and not any(graded_forwards)
    assert all(p.grad is None for p in target.parameters())
    assert [row.threat for row in rows] == ["none"] + [f"transfer:{surrogate.spec}"] * 2
    # The images the target scored under "pgd" are the surrogate's PGD images (one batch: clean, pgd, sga
    # in that order; evaluation seeds the pgd run of batch 0 with 1), not PGD crafted on the target.
    images, captions = _batch(synthetic_test_set, 6)
    on_surrogate = get_attack("pgd")(surrogate, images, captions, 4 / 255, torch.Generator().manual_seed(1)).images
    on_target = get_attack("pgd")(target, images, captions, 4 / 255, torch.Generator().manual_seed(1)).images
    assert torch.allclose(scored_inputs[1], target.normalize(on_surrogate), atol=1e-6)
    assert not torch.allclose(scored_inputs[1], target.normalize(on_target), atol=1e-6)


# ---- honesty checks --------------------------------------------------------------------------


class _QuantiseInput(nn.Module):
    """A gradient-masking "defence": rounding the input has zero gradient almost everywhere."""

    def forward(self, x):
        return torch.round(x * 4) / 4


def test_honesty_checks_flag_zero_gradients_and_stay_quiet_on_an_honest_model(tiny_clip, pretrained_tiny_clip, synthetic_test_set):
    settings = EvalSettings(attacks=("pgd", "apgd"), eps=(4 / 255,))
    assert honesty_checks(pretrained_tiny_clip, synthetic_test_set, settings, num_images=8) == []
    tiny_clip.vision = nn.Sequential(_QuantiseInput(), tiny_clip.vision)
    warnings = honesty_checks(tiny_clip, synthetic_test_set, settings, num_images=8)
    assert any("all-zero input gradient" in warning for warning in warnings)


def _row(attack, eps, tr1, ir1):
    recalls = {"tr1": tr1, "tr5": 0.0, "tr10": 0.0, "ir1": ir1, "ir5": 0.0, "ir10": 0.0}
    return RetrievalRow(attack=attack, eps=eps, recalls=recalls, threat="white-box", text_source=None, images=100, captions=500)


def test_row_warnings_catch_contradictory_results():
    rows = attach_row_warnings([_row("clean", None, 80.0, 70.0), _row("pgd", 2 / 255, 20.0, 15.0), _row("pgd", 4 / 255, 40.0, 15.0),
                                _row("apgd", 2 / 255, 50.0, 15.0), _row("sga", 2 / 255, 90.0, 60.0)])
    text = {row.attack + str(row.eps): " ".join(row.warnings) for row in rows}
    assert "smaller eps" in text["pgd" + str(4 / 255)]
    assert "above clean" in text["sga" + str(2 / 255)]
    assert text["clean" + "None"] == "" and text["pgd" + str(2 / 255)] == ""
