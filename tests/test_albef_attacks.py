"""Every evaluation attack keeps its contract white-box on a tiny random ALBEF, and with ALBEF as transfer surrogate.

The same invariants as ``tests/test_attacks.py`` (eps-ball, [0, 1], weights, modes and
gradients untouched, determinism), on ``albef:DIR@FILE``: the attacks reach the fusion
model only through ``encode_image``/``encode_text``.
"""

from __future__ import annotations

import pytest
import torch
from albef_fakes import write_tiny_albef
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from trainables.attacks import ATTACKS, TEXT_ATTACKS, get_attack
from trainables.evaluation.robustness import EvalSettings, evaluate_retrieval_rows
from trainables.models import load_model

ALL_ATTACKS = sorted(ATTACKS)
FAST = {"steps": 2}


def _batch(dataset, count: int, start: int = 0):
    items = [dataset[i] for i in range(start, start + count)]
    return torch.stack([item.image for item in items]), [item.captions for item in items]


@pytest.fixture(scope="module")
def albef_spec(tmp_path_factory) -> str:
    text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("albef-attacks"))
    return f"albef:{text_dir}@{checkpoint}"


@pytest.fixture(scope="module")
def albef(albef_spec):
    """One random tiny ALBEF shared by the property tests (hypothesis needs no per-example fixture)."""
    return load_model(albef_spec)


@pytest.mark.parametrize("name", ALL_ATTACKS)
@hypothesis_settings(max_examples=3, deadline=None)
@given(eps=st.floats(0.5 / 255, 16 / 255), batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_adversarial_images_stay_in_the_eps_ball_and_pixel_range_on_albef(name, albef, synthetic_test_set, eps, batch, seed):
    images, captions = _batch(synthetic_test_set, batch, start=seed % 50)
    output = get_attack(name)(albef, images, captions, eps, torch.Generator().manual_seed(seed), **FAST)
    assert output.images.shape == images.shape and output.images.dtype == images.dtype
    assert (output.images - images).abs().max().item() <= eps
    assert output.images.min().item() >= 0.0 and output.images.max().item() <= 1.0
    if name in TEXT_ATTACKS:
        assert [len(group) for group in output.captions] == [len(group) for group in captions]
        assert output.text_source == "offline:char"  # no open_clip token embedding: character edits only
    else:
        assert output.captions is None and output.text_source is None


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_attacks_leave_albef_weights_mode_and_gradients_untouched(name, albef_spec, synthetic_test_set):
    model = load_model(albef_spec)
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
def test_the_same_seed_gives_the_same_attack_on_albef(name, albef, synthetic_test_set):
    images, captions = _batch(synthetic_test_set, 3)
    runs = [get_attack(name)(albef, images, captions, 4 / 255, torch.Generator().manual_seed(seed), **FAST)
            for seed in (7, 7, 8)]
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].captions == runs[1].captions
    assert not torch.equal(runs[0].images, runs[2].images)


def test_albef_as_transfer_surrogate_never_differentiates_the_target(random_tiny_clip, albef, synthetic_test_set):
    target = random_tiny_clip
    target.vision.requires_grad_(True)
    graded_forwards = []
    hook = target.vision.register_forward_hook(lambda module, inputs, output: graded_forwards.append(output.requires_grad))
    try:
        rows = evaluate_retrieval_rows(target, synthetic_test_set,
                                       EvalSettings(attacks=("pgd", "sga"), eps=(4 / 255,), max_images=2), surrogate=albef)
    finally:
        hook.remove()
    assert graded_forwards and not any(graded_forwards)
    assert all(p.grad is None for p in target.parameters())
    assert [row.threat for row in rows] == ["none"] + [f"transfer:{albef.spec}"] * 2
