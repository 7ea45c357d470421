"""The defense losses against hand-computed values, and the paper's sign conventions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.attacks.pgd import PGDSettings, pgd
from trainables.defenses.fare import fare_loss
from trainables.defenses.mava import (CmsForm, cms_loss, mava_inner_loss, mava_outer_loss, sample_neighbours, sca_loss,
                                      vsse_loss)
from trainables.defenses.tecoa import class_text_features, tecoa_loss


def test_cms_is_one_minus_mean_cosine_of_mean_neighbour():
    neighbours = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # mean (0.5, 0.5)
    captions = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # cos 1/sqrt2 and 1
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 1.0)) / 2
    assert cms_loss(neighbours, captions).item() == pytest.approx(expected, abs=1e-6)
    assert cms_loss(neighbours, captions, CmsForm.NEG_COS_SUM).item() == pytest.approx(-(1 / math.sqrt(2) + 1), abs=1e-6)


def test_vsse_is_mean_squared_distance_over_neighbours():
    neighbours = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    original = torch.tensor([[0.0, 0.0]])
    assert vsse_loss(neighbours, original).item() == pytest.approx((1 + 9) / 2)
    # normalised variant: both neighbours normalise to (1, 0): distance to... original (0,0) normalises to (0,0)
    assert vsse_loss(neighbours, torch.tensor([[0.0, 2.0]]), normalized=True).item() == pytest.approx(2.0)


def test_sca_has_the_papers_half_and_the_code_variant_does_not():
    clean, original = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert sca_loss(clean, original).item() == pytest.approx(2.5)
    assert sca_loss(clean, original, half=False).item() == pytest.approx(5.0)


def test_outer_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    neighbours, clean, original, captions = torch.randn(4, 3, 8), torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 5, 8)
    terms = mava_outer_loss(neighbours, clean, original, captions, a=0.002, b=0.4, c=0.6)
    expected = 0.002 * terms["l_cms"] + 0.4 * terms["l_vsse"] + 0.6 * terms["l_sca"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(terms) == {"loss", "l_cms", "l_vsse", "l_sca"}


def test_fare_and_tecoa_by_hand():
    assert fare_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(2.0)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    classes = class_text_features(torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]]))
    expected = F.cross_entropy(torch.tensor([[10.0, 0.0], [0.0, 10.0]]), torch.tensor([0, 1]), reduction="none")
    assert torch.allclose(tecoa_loss(image, classes, logit_scale=10.0), expected)


def test_neighbours_stay_within_beta_eps_and_in_pixel_range():
    images = torch.rand(2, 3, 8, 8)
    neighbours = sample_neighbours(images, 3, radius=0.05, generator=torch.Generator().manual_seed(0))
    assert neighbours.shape == (2, 3, 3, 8, 8)
    assert (neighbours - images.unsqueeze(1)).abs().max() <= 0.05 + 1e-7
    assert neighbours.min() >= 0 and neighbours.max() <= 1


def _image_caption_cosine(model, images, captions):
    with torch.no_grad():
        return F.cosine_similarity(model.encode_image(images).unsqueeze(1), captions, dim=-1).mean().item()


def test_one_inner_step_lowers_and_one_outer_step_raises_image_caption_cosine(tiny_clip, synthetic_test_set):
    """REFERENCE-NOTES 'Sign conventions': the inner max pushes images away from their captions, the outer min pulls them back."""
    items = [synthetic_test_set[i] for i in range(16)]
    images = torch.stack([item.image for item in items])
    with torch.no_grad():
        captions = torch.stack([tiny_clip.encode_text(list(item.captions)) for item in items])
        original = tiny_clip.encode_image_original(images)
    encode = tiny_clip.encode_image

    def inner(x):
        return mava_inner_loss(encode(x), original, captions)

    before = _image_caption_cosine(tiny_clip, images, captions)
    adversarial = pgd(inner, images, PGDSettings(eps=4 / 255, steps=1, step_size=4 / 255, random_start=False), torch.Generator().manual_seed(0))
    after_inner = _image_caption_cosine(tiny_clip, adversarial, captions)
    assert after_inner < before

    # Outer step with only the CMS term: one SGD step on the vision encoder raises the cosine at x'.
    optimizer = torch.optim.SGD(tiny_clip.vision.parameters(), lr=1e-2)
    features = encode(adversarial)
    loss = mava_outer_loss(features.unsqueeze(1), features, original, captions, a=1.0, b=0.0, c=0.0)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert _image_caption_cosine(tiny_clip, adversarial, captions) > after_inner


# ---- the inner attack's neighbourhood is a named option (issue 14, defect 5) -------------------


@pytest.mark.parametrize("inner, views_per_image", [("zero", 1), ("neighbours", 3)])
def test_the_inner_attack_evaluates_eq5_at_r0_or_over_n_neighbours_as_configured(inner, views_per_image):
    from trainables.config import TrainConfig
    from trainables.steps import mava_step

    torch.manual_seed(0)
    projection = torch.nn.Linear(3 * 4 * 4, 8)
    seen: list[int] = []

    def attack_encode(pixels):
        seen.append(pixels.shape[0])
        return projection(pixels.flatten(1))

    config = TrainConfig(inner_neighbourhood=inner, N=3, pgd_steps=2)
    images = torch.rand(2, 3, 4, 4)
    terms = mava_step(attack_encode, lambda pixels: projection(pixels.flatten(1)), images, torch.randn(2, 5, 8),
                      torch.randn(2, 8), config, torch.Generator().manual_seed(0))
    # Each of the 2 PGD steps encodes the 2 images once (r = 0, the authors' code) or their N = 3 neighbours (Eq. 5).
    assert seen == [2 * views_per_image] * 2 and torch.isfinite(terms["loss"])
    assert TrainConfig().inner_neighbourhood.value == "zero"  # the documented default: the code's r = 0


@pytest.mark.parametrize("random_start", [True, False])
def test_mava_inner_random_start_is_a_named_option(random_start):
    from trainables.config import TrainConfig
    from trainables.steps import mava_step

    torch.manual_seed(0)
    projection = torch.nn.Linear(3 * 4 * 4, 8)
    first: list[torch.Tensor] = []

    def attack_encode(pixels):
        first.append(pixels.detach().clone())
        return projection(pixels.flatten(1))

    images = torch.rand(2, 3, 4, 4)
    mava_step(attack_encode, lambda pixels: projection(pixels.flatten(1)), images, torch.randn(2, 5, 8), torch.randn(2, 8),
              TrainConfig(mava_random_start=random_start, pgd_steps=1), torch.Generator().manual_seed(0))
    # The authors' code starts the inner PGD at the clean image; the default starts at a random point of the ball.
    assert torch.equal(first[0], images) is not random_start
