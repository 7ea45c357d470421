"""ALBEF's GradCAM helper: the formula, untouched parameter gradients, a peak on the referred patch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.evaluation.gradcam import gradcam_map, patch_grid, upsample_map


class TinyCrossAttention(nn.Module):
    """One cross-attention layer (text queries, image keys) whose score reads one feature of the attended values.

    The values are the image tokens themselves and the score is feature 0 of the first
    text position's attended value: only a patch whose token has feature 0 set (the
    "referred object") raises the score, so only its attention gets a positive gradient.
    """

    def __init__(self, width: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width * heads)
        self.key = nn.Linear(width, width * heads)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, width = text.shape
        q = self.query(text).view(batch, length, self.heads, width).transpose(1, 2)  # (B, h, L, W)
        k = self.key(image).view(batch, image.shape[1], self.heads, width).transpose(1, 2)  # (B, h, T, W)
        attention = torch.softmax(q @ k.transpose(-1, -2) / width ** 0.5, dim=-1)  # (B, h, L, T)
        attended = attention @ image.unsqueeze(1)  # (B, h, L, W): values = image tokens
        score = attended[:, :, 0, 0].mean(dim=1)  # (B,)
        return score, attention


def _image_tokens(batch: int, patches: int, referred: list[int], width: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = torch.randn(batch, 1 + patches, width)
    tokens[:, :, 0] = 0.0  # no token carries the scored feature ...
    for b, patch in enumerate(referred):
        tokens[b, 1 + patch, 0] = 5.0  # ... except the referred patch (token 0 is the image [CLS])
    return tokens


def test_the_map_is_albef_formula_mean_over_heads_and_all_text_positions():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 1 + 9, requires_grad=True)
    attention = torch.softmax(logits, dim=-1)
    weights = torch.randn(2, 3, 4, 1 + 9)
    score = (attention * weights).sum(dim=(1, 2, 3))  # dS/dA = weights
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = gradcam_map(score, attention, text_mask=mask)
    a, g = attention.detach()[..., 1:], weights[..., 1:].clamp(min=0)
    expected = (a * g * mask.view(2, 1, 4, 1)).sum(dim=(1, 2)) / (3 * 4)  # padded rows count in the mean, as ALBEF
    assert got.shape == (2, 3, 3)
    assert torch.allclose(got, expected.view(2, 3, 3), atol=1e-6)
    assert (got >= 0).all()


def test_gradcam_leaves_parameter_gradients_untouched_and_keeps_the_graph():
    layer = TinyCrossAttention()
    text = torch.randn(2, 3, 8)
    image = _image_tokens(2, 16, [5, 10]).requires_grad_()
    score, attention = layer(text, image)
    gradcam_map(score, attention)
    assert all(p.grad is None for p in layer.parameters())
    marker = [torch.full_like(p, 7.0) for p in layer.parameters()]
    for p, m in zip(layer.parameters(), marker):
        p.grad = m.clone()
    score, attention = layer(text, image)
    gradcam_map(score, attention)
    assert all(torch.equal(p.grad, m) for p, m in zip(layer.parameters(), marker))
    assert image.grad is None
    score.sum().backward()  # the graph survives the helper (retain_graph)


def test_frozen_model_works_with_image_tokens_that_require_grad():
    layer = TinyCrossAttention().requires_grad_(False)
    score, attention = layer(torch.randn(1, 3, 8), _image_tokens(1, 16, [3]))
    with pytest.raises(ValueError, match="not part of an autograd graph"):
        gradcam_map(score, attention)
    score, attention = layer(torch.randn(1, 3, 8), _image_tokens(1, 16, [3]).requires_grad_())
    assert int(gradcam_map(score, attention).flatten().argmax()) == 3


@pytest.mark.parametrize("patches,referred", [(16, [5, 10]), (9, [0, 8]), (36, [17, 30])])
def test_the_map_peaks_on_the_referred_patch(patches, referred):
    layer = TinyCrossAttention()
    text = torch.randn(len(referred), 3, 8)
    score, attention = layer(text, _image_tokens(len(referred), patches, referred).requires_grad_())
    grid = patch_grid(patches)
    cam = gradcam_map(score, attention)
    assert cam.shape == (len(referred), grid, grid)
    assert [int(c.flatten().argmax()) for c in cam] == referred
    # Upsampled to a 48 x 48 image, the peak pixel lies in the referred patch's cell.
    heat = gradcam_map(*layer(text, _image_tokens(len(referred), patches, referred).requires_grad_()), image_size=(48, 48))
    cell = 48 // grid
    for b, patch in enumerate(referred):
        y, x = divmod(int(heat[b].flatten().argmax()), 48)
        assert (y // cell, x // cell) == divmod(patch, grid)


def test_grid_comes_from_the_patch_count():
    assert [patch_grid(n) for n in (1, 4, 576)] == [1, 2, 24]
    with pytest.raises(ValueError, match="square grid"):
        patch_grid(10)
    attention = torch.softmax(torch.randn(1, 2, 3, 1 + 10, requires_grad=True), dim=-1)
    with pytest.raises(ValueError, match="square grid"):
        gradcam_map(attention.sum(dim=(1, 2, 3)), attention)


def test_upsampling_is_bicubic_to_height_and_width():
    grid = torch.arange(16.0).view(4, 4)
    out = upsample_map(grid, (10, 20))
    expected = torch.nn.functional.interpolate(grid.view(1, 1, 4, 4), size=(10, 20), mode="bicubic", align_corners=False)[0, 0]
    assert out.shape == (10, 20) and torch.equal(out, expected)
    assert upsample_map(grid.expand(3, 4, 4), (8, 8)).shape == (3, 8, 8)


# ---- on a fake ALBEF: the real fusion layers, the real ITM head ---------------------------


@pytest.fixture(scope="module")
def fake_albef(tmp_path_factory):
    from albef_fakes import write_tiny_albef
    from trainables.models.albef import load_albef

    text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("gradcam-albef"))
    return load_albef(text_dir, checkpoint, "albef:fake")


def test_albef_gradcam_leaves_parameter_gradients_and_modes_untouched(fake_albef):
    from trainables.evaluation.grounding_eval import grounding_maps

    model = fake_albef
    model.train()
    model.vision.requires_grad_(True)  # as during fine-tuning: the ViT's weights could receive gradients
    marked = dict(list(model.named_parameters())[:3])
    for p in marked.values():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    maps = grounding_maps(model, torch.rand(2, 3, model.image_size, model.image_size), ["the red circle", "a shape"])
    grid = model.vision.config.grid
    assert maps.shape == (2, grid, grid) and (maps >= 0).all() and maps.sum() > 0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, torch.full_like(p, 7.0)) if name in marked else p.grad is None, name
        p.grad = None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert modes == {n: m.training for n, m in model.named_modules()}
    model.eval()
    model.vision.requires_grad_(False)


def test_albef_gradcam_layer_is_albefs_layer_8_of_12_and_refuses_a_text_layer(fake_albef):
    from trainables.errors import UserError

    class Config:
        fusion_layer, num_hidden_layers = 6, 12

    base = type(fake_albef)
    assert base.gradcam_layer.fget(type("M", (), {"text_encoder": type("T", (), {"config": Config})})()) == 8
    assert fake_albef.gradcam_layer == 1  # the fake's one fusion layer (fusion_layer 1 of 2)
    with pytest.raises(UserError, match="not a fusion layer"):
        fake_albef.itm_cross_attention(torch.rand(1, 3, 32, 32), ["a shape"], layer=0)


def test_albef_gradcam_peaks_on_the_referred_object(fake_albef, monkeypatch):
    """Hand-made: only the referred patch's image token carries feature 0, and the GradCAM layer's
    cross-attention values read only that feature (value = u * token[0]); the ITM head is oriented
    so that u raises the match logit. ALBEF's map must then be zero everywhere but that patch,
    and the upsampled map must pick the referred object's proposal."""
    import copy

    from trainables.evaluation.grounding import ground
    from trainables.evaluation.grounding_eval import grounding_maps

    model = copy.deepcopy(fake_albef)
    grid, width = model.vision.config.grid, model.vision.config.width
    referred = [5, 10]  # patch index per item: (row 1, col 1) and (row 2, col 2) of the 4x4 grid
    tokens = _image_tokens(len(referred), grid * grid, referred, width=width)
    monkeypatch.setattr(model, "image_tokens", lambda pixels: tokens.clone())
    value = model.text_encoder.encoder.layer[model.gradcam_layer].crossattention.self.value
    u = torch.randn(value.out_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        value.weight.zero_()
        value.weight[:, 0] = u
        value.bias.zero_()
    pixels, texts = torch.rand(2, 3, 32, 32), ["the red circle", "the blue square"]
    maps = grounding_maps(model, pixels, texts)
    if maps.sum() == 0:  # every d(logit)/d(context) . u was <= 0: orient the ITM head the other way
        with torch.no_grad():
            model.itm_head.weight[1].neg_()
            model.itm_head.bias[1].neg_()
        maps = grounding_maps(model, pixels, texts)
    for b, patch in enumerate(referred):
        flat = maps[b].flatten()
        assert int(flat.argmax()) == patch and flat[patch] > 0
        assert torch.count_nonzero(flat) == 1  # zero wherever the value carries nothing of u
    # 64 x 64 original image: patch (r, c) covers [16c, 16c + 16) x [16r, 16r + 16).
    referred_box, other_box = (16.0, 16.0, 16.0, 16.0), (40.0, 0.0, 20.0, 20.0)
    assert ground(maps[0], (64, 64), [other_box, referred_box]) == referred_box
    assert ground(maps[1], (64, 64), [referred_box, (32.0, 32.0, 16.0, 16.0)]) == (32.0, 32.0, 16.0, 16.0)


# ---- the picture: the map drawn over the image --------------------------------------------


def test_heat_overlay_marks_the_map_peak_and_leaves_a_map_without_evidence_dark():
    from trainables.evaluation.gradcam import heat_overlay

    images = torch.full((2, 3, 4, 4), 0.4)
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2] = 3.0  # the peak
    maps[0, 0, 0] = 1.0  # a third of it
    maps[0, 3, 3] = -5.0  # negative evidence is dropped, as in GradCAM
    drawn = heat_overlay(images, maps)  # image 1: no positive value anywhere
    assert torch.allclose(drawn[0, :, 1, 2], torch.tensor([0.7, 0.7, 0.7]))  # 0.5 * 0.4 + 0.5 * white
    assert torch.allclose(drawn[0, :, 0, 0], torch.tensor([0.7, 0.2, 0.2]))  # a third of the peak: pure red
    assert torch.allclose(drawn[0, :, 3, 3], torch.full((3,), 0.2)) and torch.allclose(drawn[1], torch.full((3, 4, 4), 0.2))
    with pytest.raises(ValueError, match="same size"):
        heat_overlay(images, torch.zeros(2, 3, 3))


def test_ve_gradcam_scores_the_given_class_without_touching_parameter_gradients(tmp_path):
    """The VE head's GradCAM (the paper's Figure 5) scores the logit of each pair's given class,
    reads the same fusion layer, and touches no parameter gradient."""
    from albef_fakes import write_tiny_albef
    from trainables.evaluation.gradcam import gradcam_map
    from trainables.models.albef import load_albef

    text_dir, checkpoint = write_tiny_albef(tmp_path, variant="ve")
    model = load_albef(text_dir, checkpoint, "albef:fake-ve").eval()
    pixels, texts = torch.rand(3, 3, model.image_size, model.image_size), ["a red circle", "a shape", "the blue square"]
    labels = torch.tensor([2, 0, 1])
    scores, attention, mask = model.entailment_cross_attention(pixels, texts, labels)
    with torch.no_grad():
        expected = model.entailment_logits(pixels, texts).gather(1, labels.view(-1, 1))[:, 0]
    assert torch.allclose(scores, expected, atol=1e-5)
    other, _, _ = model.entailment_cross_attention(pixels, texts, (labels + 1) % 3)
    assert not torch.allclose(other, scores)  # a different class is a different score
    maps = gradcam_map(scores, attention, mask)
    assert maps.shape == (3, model.vision.config.grid, model.vision.config.grid) and maps.sum() > 0
    assert all(p.grad is None for p in model.parameters())
    from trainables.errors import UserError

    with pytest.raises(UserError, match="itm_head"):
        model.itm_cross_attention(pixels, texts)
