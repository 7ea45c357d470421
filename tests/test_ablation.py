"""The paper's Table 4 ablations (``ablate``) and N = 0: each removes exactly what docs/analyses.md says it does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.config import TrainConfig
from trainables.defenses.mava import sample_neighbours
from trainables.steps import mava_step, mava_weights, term_weights

B, M, D = 3, 2, 4


class Encoder(nn.Module):
    """A small non-linear image encoder: features depend on every pixel, so PGD has gradients to follow."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Tanh(), nn.Linear(8, D))

    def forward(self, x):
        return self.net(x)


def step_terms(config: TrainConfig, captions: torch.Tensor) -> dict[str, float]:
    encoder = Encoder()
    images = torch.rand(B, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original = encoder(images) + 0.1
    terms = mava_step(encoder, encoder, images, captions, original, config, torch.Generator().manual_seed(2))
    return {k: float(v) for k, v in terms.items()}


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"eps": 8 / 255, "pgd_steps": 3, "N": 2, "M": M, **overrides})


CAPTIONS = [torch.randn(B, M, D, generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)]


@pytest.mark.parametrize("ablate, expected", [
    ("none", (0.002, 0.4, 0.6, 3, True)), ("cms", (0.0, 0.4, 0.6, 3, False)),
    ("vsse", (0.002, 0.4, 0.6, 0, True)), ("sca", (0.002, 0.4, 0.0, 3, True)),
])
def test_each_ablation_removes_its_term_only(ablate, expected):
    weights = mava_weights(TrainConfig(ablate=ablate))
    assert (weights.a, weights.b, weights.c, weights.N, weights.inner_cms) == expected
    assert term_weights(TrainConfig(ablate=ablate)) == {"l_cms": expected[0], "l_vsse": expected[1], "l_sca": expected[2]}


def test_zero_neighbours_is_the_adversarial_point_alone():
    images = torch.rand(2, 3, 4, 4)
    assert torch.equal(sample_neighbours(images, 0, 0.1, torch.Generator().manual_seed(0)), images.unsqueeze(1))


def test_without_cms_the_attack_no_longer_reads_the_captions():
    # Full MAVA: the inner PGD ascends L_CMS too, so other captions move the adversarial image and L_VSSE with it.
    full = [step_terms(config(), captions) for captions in CAPTIONS]
    assert full[0]["l_vsse"] != pytest.approx(full[1]["l_vsse"], rel=1e-6)
    ablated = [step_terms(config(ablate="cms"), captions) for captions in CAPTIONS]
    assert ablated[0]["l_vsse"] == pytest.approx(ablated[1]["l_vsse"], rel=1e-6)  # the attack ignores the captions
    for terms in ablated:  # and the outer loss has no L_CMS (a = 0), though it is still logged
        assert terms["loss"] == pytest.approx(0.4 * terms["l_vsse"] + 0.6 * terms["l_sca"], rel=1e-5)


def test_without_vsse_no_neighbour_is_sampled():
    # The neighbour radius beta*eps only matters when neighbours are drawn.
    full = [step_terms(config(beta=beta), CAPTIONS[0]) for beta in (0.5, 3.0)]
    assert full[0]["l_vsse"] != pytest.approx(full[1]["l_vsse"], rel=1e-6)
    ablated = [step_terms(config(ablate="vsse", beta=beta), CAPTIONS[0]) for beta in (0.5, 3.0)]
    assert ablated[0] == pytest.approx(ablated[1], rel=1e-6)
    assert ablated[0] == pytest.approx(step_terms(config(N=0), CAPTIONS[0]), rel=1e-6)  # the same as N = 0


def test_without_sca_the_loss_has_no_sca_term():
    terms = step_terms(config(ablate="sca"), CAPTIONS[0])
    assert terms["l_sca"] > 0 and terms["loss"] == pytest.approx(0.002 * terms["l_cms"] + 0.4 * terms["l_vsse"], rel=1e-5)


def test_an_ablation_of_another_defense_is_refused():
    with pytest.raises(ValueError, match="ablate: sca removes a term of MAVA's loss, but defense is fare"):
        TrainConfig(defense="fare", ablate="sca")
