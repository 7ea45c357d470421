"""``neighbours: authors_pgd2`` is the MAVA authors' ``pgd_2`` (issue 14, defect 3).

The oracle below is written from REFERENCE-NOTES (MAVA: "the average of the last N+1
PGD iterates"; "10 steps, step 1/255, no random start, Nesterov look-ahead + momentum
1.0, sign steps") and the released ``pgd_2`` as a plain loop in the script's own style
(batch-mean cost, ``clamp`` projection, a list of iterates, ``sum / (N+1)``). It calls no
helper of the implementation: neither ``trainables.attacks`` nor ``trainables.defenses``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainables.config import TrainConfig, train_config_from
from trainables.errors import UserError
from trainables.steps import mava_step

B, C, H, W, M, D = 3, 3, 4, 4, 2, 6
EPS, STEP = 4 / 255, 1 / 255


def tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * H * W, 16), torch.nn.Tanh(), torch.nn.Linear(16, D))


def paper_inner_objective(features, original, captions):
    """Eq. 5 at the default options, per image: mean over M of (1 - cos) + ||F - F_org||^2 (raw embeddings)."""
    cms = torch.stack([1 - F.cosine_similarity(features, captions[:, m], dim=-1) for m in range(captions.shape[1])]).mean(0)
    return cms + ((features - original) ** 2).sum(-1)


def oracle_pgd2(encoder, images, original, captions, eps, step, iterations, n, decay=1.0):
    """pgd_2 written out: look-ahead momentum sign steps from the clean image; mean of the last N+1 iterates."""
    momentum = torch.zeros_like(images)
    adv = images.clone()
    kept = []
    for _ in range(iterations):
        adv.requires_grad = True
        nes = adv + decay * step * momentum
        cost = paper_inner_objective(encoder(nes), original, captions).mean()
        grad = torch.autograd.grad(cost, adv)[0]
        grad = grad / torch.mean(torch.abs(grad), dim=(1, 2, 3), keepdim=True)
        grad = grad + momentum * decay
        momentum = grad
        adv = adv.detach() + step * grad.sign()
        delta = torch.clamp(adv - images, min=-eps, max=eps)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
        kept.append(adv)
    total = torch.zeros_like(adv)
    for image in kept[iterations - n - 1:]:
        total += image
    return total / (n + 1)


def run_step(images, captions, original, config):
    """mava_step with the tiny encoder; returns its loss terms and the views its outer forward encoded."""
    encoder = tiny_encoder()
    seen = []

    def train_encode(pixels):
        seen.append(pixels.detach().clone())
        return encoder(pixels)

    terms = mava_step(encoder, train_encode, images, captions, original, config, torch.Generator().manual_seed(0))
    return terms, seen[0]


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(B, C, H, W, generator=generator)
    images[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # pixels at the box's edges
    return images, torch.randn(B, M, D, generator=generator), torch.randn(B, D, generator=generator)


@pytest.mark.parametrize("steps, n", [(10, 3), (5, 4), (4, 1)])
def test_authors_pgd2_matches_an_independent_oracle_and_encodes_one_averaged_view(steps, n):
    images, captions, original = batch()
    config = TrainConfig(neighbours="authors_pgd2", mava_random_start=False, N=n, pgd_steps=steps, eps=EPS, pgd_step_size=STEP)
    terms, views = run_step(images, captions, original, config)
    encoder = tiny_encoder()
    expected = oracle_pgd2(encoder, images, original, captions, EPS, STEP, steps, n)

    # The outer forward saw B averaged images, then the B clean ones: one view per image, not N.
    assert views.shape == (2 * B, C, H, W)
    assert torch.allclose(views[:B], expected, atol=1e-6, rtol=0)
    assert torch.equal(views[B:], images)
    # One F(x_avg) in every term (defaults: raw embeddings, 1 - cos, 0.5 on L_SCA, a, b, c = 0.002, 0.4, 0.6).
    with torch.no_grad():
        adv, clean = encoder(expected), encoder(images)
        l_vsse = ((adv - original) ** 2).sum(-1).mean()
        l_cms = torch.stack([1 - F.cosine_similarity(adv, captions[:, m], dim=-1) for m in range(M)]).mean(0).mean()
        l_sca = (0.5 * ((clean - original) ** 2).sum(-1)).mean()
    for key, value in {"l_vsse": l_vsse, "l_cms": l_cms, "l_sca": l_sca, "loss": 0.002 * l_cms + 0.4 * l_vsse + 0.6 * l_sca}.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), key


def test_the_oracle_discriminates_the_look_ahead_momentum_and_the_average():
    # Without these checks an implementation with no momentum, or the last iterate alone, might match by luck.
    images, captions, original = batch()
    encoder = tiny_encoder()
    authors = oracle_pgd2(encoder, images, original, captions, EPS, STEP, 10, 3)
    assert not torch.allclose(authors, oracle_pgd2(encoder, images, original, captions, EPS, STEP, 10, 3, decay=0.0), atol=1e-4)
    assert not torch.allclose(authors, oracle_pgd2(encoder, images, original, captions, EPS, STEP, 10, 0), atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_the_averaged_image_stays_in_the_eps_ball_exactly_and_in_the_pixel_box(seed):
    images, captions, original = batch(seed)
    images = images.round()  # every pixel at 0 or 1: projections clamp at both boxes
    eps = 3 / 255  # float32(3/255) rounds above 3/255
    config = TrainConfig(neighbours="authors_pgd2", mava_random_start=False, N=3, pgd_steps=6, eps=eps, pgd_step_size=eps)
    _, views = run_step(images, captions, original, config)
    averaged = views[:B]
    assert (averaged.double() - images.double()).abs().max().item() <= eps
    assert averaged.min() >= 0 and averaged.max() <= 1
    assert (averaged != images).any()


def test_authors_pgd2_refuses_a_random_start_and_too_few_steps():
    with pytest.raises(UserError, match=r"authors_pgd2 is the authors' pgd_2, which starts at the clean image: set mava_random_start: false"):
        train_config_from({"neighbours": "authors_pgd2"})
    with pytest.raises(UserError, match=r"averages the last N\+1 = 4 PGD iterates, but pgd_steps is 3: set pgd_steps to 4 or more"):
        train_config_from({"neighbours": "authors_pgd2", "mava_random_start": False, "N": 3, "pgd_steps": 3})
    # The other defenses ignore MAVA's neighbours, so the MAVA-only rule does not refuse them.
    assert TrainConfig(defense="fare", neighbours="authors_pgd2").mava_random_start


def test_the_old_trajectory_name_is_refused_with_the_new_names():
    from conftest import REPO_ROOT
    from platform.sweep_spec import load_sweep_spec

    with pytest.raises(UserError, match=r"'trajectory' was renamed: .*neighbours: last_iterates .*neighbours: authors_pgd2"):
        train_config_from({"neighbours": "trajectory"})
    with pytest.raises(UserError, match=r"abc.yaml: key 'experiment.neighbours': 'trajectory' was renamed: .*authors_pgd2"):
        load_sweep_spec(REPO_ROOT / "search_spaces" / "abc.yaml", {"experiment.neighbours": "trajectory"})


def test_last_iterates_keeps_the_previous_reading_under_its_own_name():
    # N views per image: the last N iterates of the plain PGD (random start by default).
    images, captions, original = batch()
    _, views = run_step(images, captions, original, TrainConfig(neighbours="last_iterates", N=3, pgd_steps=5))
    assert views.shape == ((3 + 1) * B, C, H, W)


def test_the_neighbour_mode_is_a_trial_param():
    from platform.tracking import trial_params

    options = {"neighbours": "authors_pgd2", "mava_random_start": False}
    trial = SimpleNamespace(trial_id="t1", config={"train": options, "sweep": {"searched": []}})
    params = trial_params(trial)
    assert params["neighbours"] == "authors_pgd2" and params["mava_random_start"] is False


def test_pgd2_agrees_with_the_benchmarks_reimplementation_of_the_authors_step():
    # benchmarks/authors_mava.py re-implements pgd_2 for the speed comparison, from the script itself.
    from benchmarks.authors_mava import authors_pgd
    from trainables.attacks.pgd import PGDSettings
    from trainables.attacks.pgd2 import pgd2_average

    images, captions, original = batch()
    encoder = tiny_encoder()
    target = F.normalize(original, dim=-1)

    def inner(unit_features):
        return ((unit_features - target) ** 2).sum(-1).mean()

    config = TrainConfig(neighbours="authors_pgd2", mava_random_start=False, N=3, pgd_steps=10, eps=EPS, pgd_step_size=STEP)
    theirs = authors_pgd(SimpleNamespace(encode_image=encoder), images, inner, config)
    ours = pgd2_average(lambda x: inner(F.normalize(encoder(x), dim=-1)), images,
                        PGDSettings(eps=EPS, steps=10, step_size=STEP, random_start=False), average=4)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0)
