"""PGD invariants: exact eps-ball, pixel range, model untouched, seeded determinism."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainables.attacks.pgd import PGDSettings, pgd
from trainables.attacks.projection import project_linf


@settings(max_examples=60, deadline=None)
@given(eps=st.floats(1e-6, 1.0), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 3.0))
def test_projection_holds_the_eps_ball_exactly_and_pixel_range(eps, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    original = torch.rand(64, generator=generator)
    candidate = original + scale * (torch.rand(64, generator=generator) * 2 - 1)
    projected = project_linf(candidate, original, eps)
    assert (projected - original).abs().max().item() <= eps
    assert projected.min() >= 0 and projected.max() <= 1


def _linear_objective(weight):
    return lambda x: (x.flatten(1) * weight).sum(dim=1)


@settings(max_examples=25, deadline=None)
@given(eps=st.floats(1 / 255, 16 / 255), steps=st.integers(1, 5), seed=st.integers(0, 1000), batch=st.integers(1, 4))
def test_pgd_output_in_ball_and_range(eps, steps, seed, batch):
    images = torch.rand(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    weight = torch.randn(3 * 8 * 8, generator=torch.Generator().manual_seed(seed + 1))
    adversarial = pgd(_linear_objective(weight), images, PGDSettings(eps=eps, steps=steps, step_size=eps / 2), torch.Generator().manual_seed(seed))
    assert (adversarial - images).abs().max().item() <= eps
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_pgd_increases_its_objective():
    images = torch.full((2, 3, 4, 4), 0.5)
    weight = torch.randn(48)
    objective = _linear_objective(weight)
    adversarial = pgd(objective, images, PGDSettings(eps=4 / 255, steps=10, step_size=1 / 255, random_start=False), torch.Generator().manual_seed(0))
    # A linear objective is maximised at x + eps * sign(w): PGD must reach it.
    assert torch.allclose(objective(adversarial), objective(images + 4 / 255 * weight.sign().view(1, 3, 4, 4)), atol=1e-5)


def test_pgd_is_deterministic_given_the_generator_and_leaves_the_model_untouched(tiny_clip, synthetic_test_set):
    images = torch.stack([synthetic_test_set[i].image for i in range(4)])
    tiny_clip.train()
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}

    def run(seed):
        return pgd(lambda x: tiny_clip.encode_image(x).norm(dim=1), images, PGDSettings(eps=2 / 255, steps=3), torch.Generator().manual_seed(seed))

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert tiny_clip.training
    assert all(torch.equal(before[k], v) for k, v in tiny_clip.state_dict().items())
    assert all(p.grad is None for p in tiny_clip.parameters())
