"""Adversarial-example pictures: what they show is what the attack did, and a trial writes them after its last epoch."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from trainables.config import TrainConfig
from trainables.evaluation.examples import (EXAMPLES_DIR, INDEX_FILE, PAGE_FILE, Example, amplified, changed_words,
                                            encoder_examples, read_examples)
from trainables.evaluation.examples_page import examples_fragment
from trainables.train import run_training


def test_changed_words_marks_only_substituted_words():
    assert changed_words("a red circle on the left", "a red cirle on the left") == [2]
    assert changed_words("a red circle", "a red circle") == []
    assert changed_words("a red circle", "a circle") == [0, 1]  # not word for word: every word is marked


def test_amplified_perturbation_maps_the_eps_ball_onto_the_grey_range():
    eps = 4 / 255
    delta = torch.tensor([-eps, 0.0, eps / 2, eps])
    assert torch.allclose(amplified(delta, eps), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_examples_show_the_attacked_images_and_what_each_encoder_retrieves(random_tiny_clip, synthetic_test_set):
    eps = 4 / 255
    examples, pictures = encoder_examples(random_tiny_clip, "undefended", synthetic_test_set, ("pgd",), (eps,), count=2, seed=0)
    assert [(x.attack, x.image) for x in examples] == [("clean", 0), ("clean", 1), ("pgd", 0), ("pgd", 1)]
    clean = {x.image: x for x in examples if x.attack == "clean"}
    for example in examples:
        assert len(example.top) == 3 and example.png in pictures
        if example.attack == "clean":
            assert example.delta_png is None and example.linf == 0.0
            continue
        adversarial = pictures[example.png]
        original = pictures[clean[example.image].png]
        assert float((adversarial - original).abs().max()) <= eps  # the picture is the eps-bounded adversarial image
        assert 0 < example.linf <= 4.0
        assert torch.allclose(pictures[example.delta_png], amplified(adversarial - original, eps))
        assert example.changed == [[] for _ in example.captions]  # PGD leaves the captions alone
    assert all(example.cam_png is None for example in examples)  # a dual encoder has no ITM cross-attention to draw


def test_fusion_model_examples_draw_gradcam_of_the_attacked_image_with_its_first_caption(tmp_path, synthetic_test_set):
    from albef_fakes import write_tiny_albef
    from trainables.evaluation.examples import gradcam_pictures
    from trainables.evaluation.gradcam import gradcam_map, heat_overlay
    from trainables.models.albef import load_albef

    model = load_albef(*write_tiny_albef(tmp_path), "albef:fake").eval()
    examples, pictures = encoder_examples(model, "undefended", synthetic_test_set, ("pgd", "sga"), (4 / 255,), count=2, seed=0)
    assert all(example.cam_png in pictures for example in examples)
    for example in examples:
        image = pictures[example.png].unsqueeze(0)
        logits, attention, mask = model.itm_cross_attention(image, [example.captions[0]])
        expected = heat_overlay(image, gradcam_map(logits, attention, mask, image_size=tuple(image.shape[-2:])))[0]
        assert torch.allclose(pictures[example.cam_png], expected, atol=1e-5)  # the map of that image and that caption
    sga = next(x for x in examples if x.attack == "sga" and x.image == 0)
    clean = next(x for x in examples if x.attack == "clean" and x.image == 0)
    assert not torch.equal(pictures[sga.cam_png], pictures[clean.cam_png])  # the attack moved the map
    assert all(p.grad is None for p in model.parameters())
    fragment = examples_fragment(examples, src=lambda name: name)
    assert f'src="{sga.cam_png}"' in fragment and "GradCAM" in fragment
    assert gradcam_pictures(model, image, ["a red circle"]).shape == image.shape


def test_blip_retrieval_examples_draw_gradcam_of_its_itm_cross_attention(tmp_path, synthetic_test_set):
    from test_real_models import write_blip_dir
    from transformers import BlipForImageTextRetrieval

    from trainables.errors import UserError
    from trainables.evaluation.examples import has_gradcam
    from trainables.evaluation.gradcam import gradcam_map, heat_overlay
    from trainables.models import load_model

    model = load_model(f"hf-blip-itr:{write_blip_dir(tmp_path / 'blip', BlipForImageTextRetrieval)}").eval()
    assert has_gradcam(model)
    image = synthetic_test_set[0].image.unsqueeze(0)
    logits, attention, mask = model.itm_cross_attention(image, ["a red circle"])
    assert attention.shape[0] == 1 and attention.shape[-1] == 1 + 16 and mask.shape == attention.shape[:1] + attention.shape[2:3]
    assert torch.allclose(logits, model.itm_scores(image, ["a red circle"])[0], atol=1e-5)  # the ITM logit retrieval re-ranks with
    (grad,) = torch.autograd.grad(logits.sum(), attention)
    assert float(grad.abs().sum()) > 0 and all(p.grad is None for p in model.parameters())
    examples, pictures = encoder_examples(model, "undefended", synthetic_test_set, ("pgd",), (4 / 255,), count=1, seed=0)
    assert [x.attack for x in examples] == ["clean", "pgd"]
    for example in examples:
        image = pictures[example.png].unsqueeze(0)
        logits, attention, mask = model.itm_cross_attention(image, [example.captions[0]])
        expected = heat_overlay(image, gradcam_map(logits, attention, mask, image_size=tuple(image.shape[-2:])))[0]
        assert torch.allclose(pictures[example.cam_png], expected, atol=1e-5)
    with pytest.raises(UserError, match="GradCAM layer 5 is not a layer of .*choose one of 0..0"):
        model.itm_cross_attention(image, ["a red circle"], layer=5)


def test_the_page_highlights_replaced_words_and_ticks_own_captions():
    example = Example(encoder="fine-tuned", image=0, attack="sga", eps="2/255", top=[("a red circle", True), ("a blue square", False)],
                      captions=["a red cirle", "a big circle"], changed=[[2], []], linf=2.0, png="x.png", delta_png="d.png")
    fragment = examples_fragment([example], src=lambda name: f"files/{name}")
    assert '<img src="files/x.png"' in fragment and '<img src="files/d.png"' in fragment
    assert "a red <mark>cirle</mark>" in fragment and "a big circle" not in fragment  # only changed captions are listed
    assert re.search(r'class="hit">✓ a red circle<', fragment) and re.search(r'class="">a blue square<', fragment)


def test_a_trial_writes_its_examples_beside_the_last_checkpoint(random_tiny_clip_weights, tmp_path):
    config = TrainConfig(model=f"tiny-clip@{random_tiny_clip_weights}", defense="fare", train_data="synthetic:train,n=6",
                         eval_data="synthetic:test,n=4", epochs=2, batch_size=6, pgd_steps=1, eval_every=0,
                         eval_eps=("2/255", "4/255"), examples=2, lr=1e-2)
    checkpoints = []
    run_training(config, lambda metrics, checkpoint: checkpoints.append(checkpoint), tmp_path)
    assert not (checkpoints[0] / EXAMPLES_DIR).exists()  # only after the last epoch
    folder = checkpoints[-1] / EXAMPLES_DIR
    context, examples = read_examples(folder)
    assert context["defense"] == "fare" and context["model"] == "tiny-clip"  # the kind: a spec's paths never reach the page
    # 2 images x (clean + pgd at the largest eval eps) x 2 encoders
    assert len(examples) == 8 and {x.eps for x in examples} == {None, "4/255"} and {x.encoder for x in examples} == {"undefended", "fine-tuned"}
    page = (folder / PAGE_FILE).read_text()
    for example in examples:
        width, height = Image.open(folder / example.png).size
        assert width == height > 0 and f'src="{example.png}"' in page
    # The undefended encoder is the base model, the fine-tuned one the trained weights: the attacks differ.
    by_key = {(x.encoder, x.attack, x.eps, x.image): x for x in examples}
    undefended = Image.open(folder / by_key[("undefended", "pgd", "4/255", 0)].png)
    fine_tuned = Image.open(folder / by_key[("fine-tuned", "pgd", "4/255", 0)].png)
    assert undefended.tobytes() != fine_tuned.tobytes()
    assert json.loads((folder / INDEX_FILE).read_text())["rows"][0]["encoder"] == "undefended"


def test_no_examples_when_switched_off(random_tiny_clip_weights, tmp_path):
    config = TrainConfig(model=f"tiny-clip@{random_tiny_clip_weights}", train_data="synthetic:train,n=6", eval_data="synthetic:test,n=4",
                         epochs=1, batch_size=6, pgd_steps=1, eval_every=0, eval_eps=("4/255",), N=2, M=3, examples=0)
    checkpoints = []
    run_training(config, lambda metrics, checkpoint: checkpoints.append(checkpoint), tmp_path)
    assert not (checkpoints[-1] / EXAMPLES_DIR).exists()
