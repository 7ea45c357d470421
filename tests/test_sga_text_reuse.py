"""SGA encodes each distinct text once (issue 19, item 3) and its output is the one of its three stages run plainly.

SGA's third stage restarts the word substitution from the clean captions, so the captions,
their blanked variants and many candidate captions of stage 1 come back; encoding them again
was 35% of SGA's text encodes. Reusing their features must not change the attack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainables.attacks.sga import sga_attack, sga_image_attack
from trainables.attacks.text_attack import encode_texts, flatten_captions, regroup, text_attack
from trainables.attacks.text_candidates import OfflineCandidates
from trainables.data.synthetic import SyntheticWorld

EPS, STEPS = 4 / 255, 2


def _batch(model, n: int = 2):
    world = SyntheticWorld("test", n, image_size=model.image_size, seed=3)
    return torch.stack([world[i].image for i in range(n)]), [world[i].captions[:3] for i in range(n)]


def _plain_sga(model, images, captions, generator):
    """The three stages composed from the public pieces, each encoding what it needs with the model itself."""
    source = OfflineCandidates(model)
    flat, owner = flatten_captions(captions)

    def guided_by(image_features):
        guide = F.normalize(image_features.float(), dim=-1)[owner]
        return lambda features, index: -(F.normalize(features, dim=-1) * guide[index]).sum(dim=-1)

    with torch.no_grad():
        clean = model.encode_image(images)
    first = text_attack(model, flat, guided_by(clean), source, generator)
    adversarial = sga_image_attack(model, images, F.normalize(encode_texts(model, first, 512), dim=-1), owner, EPS, generator,
                                   steps=STEPS)
    with torch.no_grad():
        adversarial_features = model.encode_image(adversarial)
    return adversarial, regroup(text_attack(model, flat, guided_by(adversarial_features), source, generator), captions)


def test_sga_encodes_each_distinct_text_once(pretrained_tiny_clip, monkeypatch):
    model = pretrained_tiny_clip
    images, captions = _batch(model)
    encoded: list[str] = []
    real = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: encoded.extend(texts) or real(texts))
    output = sga_attack(model, images, captions, EPS, torch.Generator().manual_seed(0), steps=STEPS)
    assert output.captions != captions  # the text stages did substitute words (so candidates were encoded)
    assert len(set(encoded)) > 6 * 2  # captions, blanked captions and candidates
    assert len(encoded) == len(set(encoded))


def test_sga_output_is_that_of_its_stages_run_without_reuse(pretrained_tiny_clip):
    images, captions = _batch(pretrained_tiny_clip)
    output = sga_attack(pretrained_tiny_clip, images, captions, EPS, torch.Generator().manual_seed(0), steps=STEPS)
    plain_images, plain_captions = _plain_sga(pretrained_tiny_clip, images, captions, torch.Generator().manual_seed(0))
    assert output.captions == plain_captions
    assert torch.equal(output.images, plain_images)
