"""Issue 14, defect 9: Co-attack's image half moves each image *away* from its adversarial captions.

docs/attacks.md once explained Co-attack's recall rising with eps by the image stepping
*towards* the perturbed caption; the code ascends ``KL(norm T_adv || norm F(x'))``. These
checks pin the direction the docs now state, and the cause they measure: the raw clean-image
KL grows with the distance moved, the unit-norm text KL stays nearly flat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.attacks.co_attack import caption_weights, co_attack_images, co_attack_terms
from trainables.attacks.text_attack import encode_texts, flatten_captions


def test_the_image_half_moves_away_from_the_captions_and_its_clean_term_outgrows_the_text_term(pretrained_tiny_clip,
                                                                                                synthetic_test_set):
    model = pretrained_tiny_clip.eval()
    items = [synthetic_test_set[i] for i in range(8)]
    images = torch.stack([item.image for item in items])
    flat, owner = flatten_captions([item.captions for item in items])
    text_unit = F.normalize(encode_texts(model, flat, 64), dim=-1)
    weights = caption_weights(owner, len(images), images.device)
    with torch.no_grad():
        clean = model.encode_image(images).float()

    def after(eps: float) -> tuple[float, float, float]:
        adversarial = co_attack_images(model, images, text_unit, owner, eps, torch.Generator().manual_seed(0))
        with torch.no_grad():
            features = model.encode_image(adversarial).float()
            clean_term, text_term = co_attack_terms(features, clean, text_unit, weights)
            cos = (weights * (F.normalize(features, dim=-1) @ text_unit.T)).sum(dim=1)
        return cos.mean().item(), clean_term.mean().item(), text_term.mean().item()

    clean_cos = (weights * (F.normalize(clean, dim=-1) @ text_unit.T)).sum(dim=1).mean().item()
    base_text_kl = co_attack_terms(clean, clean, text_unit, weights)[1].mean().item()
    small, large = after(1 / 255), after(8 / 255)
    assert clean_cos > small[0] > large[0]  # away from the captions, further with more budget
    assert large[2] > small[2] > base_text_kl  # both terms are ascended
    # The raw clean-image KL grows many times more than the unit-norm text KL over the same budgets.
    assert (large[1] - small[1]) > 10 * (large[2] - small[2])
