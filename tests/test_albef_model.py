"""ALBEF/TCL behind the model interface: checkpoint layout, reference equality, tokenizer, pos-embed, heads, export.

Every model here is tiny and random, written by ``albef_fakes`` from the official key list
(ALBEF-TCL-NOTES §1.1-1.3); nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from albef_fakes import (FUSION_LAYER, HEADS, HIDDEN, INTERMEDIATE, MAX_POSITIONS, VIT_DEPTH, VIT_WIDTH, albef_state,
                         vit_shapes, write_checkpoint, write_text_dir, write_tiny_albef)
from safetensors.torch import save_file

from trainables.errors import UserError
from trainables.models import load_model, parse_model_spec
from trainables.models.albef import AlbefVLP, TclVLP, load_albef
from trainables.models.albef_checkpoint import export_visual_encoder
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer, pre_caption
from trainables.models.albef_vit import interpolate_pos_embed
from trainables.models.robust_checkpoint import load_robust_vision
from trainables.models.weights import load_strict, read_state_dict


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_albef(tmp_path_factory.mktemp("albef"))


@pytest.fixture()
def model(tiny_files) -> AlbefVLP:
    text_dir, checkpoint = tiny_files
    return load_model(f"albef:{text_dir}@{checkpoint}")


def _vocab_size(text_dir) -> int:
    return len((text_dir / "vocab.txt").read_text(encoding="utf-8").split())


# ---- checkpoint layout --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["retrieval", "pretrain", "ve"])
@pytest.mark.parametrize("wrapped", [True, False])
def test_official_layouts_load_strictly_with_their_weights(tmp_path, variant, wrapped):
    text_dir = write_text_dir(tmp_path / "bert")
    state = albef_state(_vocab_size(text_dir), variant, seed=3)
    checkpoint = write_checkpoint(tmp_path / "ckpt.pth", state, wrapped=wrapped)
    model = load_albef(text_dir, checkpoint, "test", image_size=32)
    prefix = "text_encoder.bert." if variant == "pretrain" else "text_encoder."
    assert torch.equal(model.vision.blocks[1].mlp.fc2.weight, state["visual_encoder.blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.text_encoder.encoder.layer[1].crossattention.self.key.weight,
                       state[prefix + "encoder.layer.1.crossattention.self.key.weight"])
    assert model.heads == ({"cls"} if variant == "ve" else {"itm"})
    if variant != "ve":
        assert torch.equal(model.itm_head.weight, state["itm_head.weight"])
        assert model.logit_scale == pytest.approx(1 / 0.07)
    else:
        assert torch.equal(model.cls_head[2].weight, state["cls_head.2.weight"])


def test_safetensors_checkpoints_load_too(tmp_path):
    text_dir = write_text_dir(tmp_path / "bert")
    state = albef_state(_vocab_size(text_dir), "retrieval", seed=1)
    save_file(state, str(tmp_path / "albef.safetensors"))
    model = load_model(f"tcl:{text_dir}@{tmp_path / 'albef.safetensors'}")
    assert isinstance(model, TclVLP) and model.family == "tcl"
    assert torch.equal(model.vision_proj.weight, state["vision_proj.weight"])


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_an_unknown_or_missing_key_is_refused_by_name(tmp_path, change):
    text_dir = write_text_dir(tmp_path / "bert")
    state = albef_state(_vocab_size(text_dir), "retrieval")
    key = "text_encoder.encoder.layer.1.crossattention.output.dense.bias"
    if change == "extra":
        key = "text_encoder.encoder.layer.0.adapter.weight"
        state[key] = torch.zeros(3)
    else:
        del state[key]
    checkpoint = write_checkpoint(tmp_path / "ckpt.pth", state)
    with pytest.raises(UserError, match=f"1 {'unexpected' if change == 'extra' else 'missing'}.*{key.replace('.', '[.]')}"):
        load_albef(text_dir, checkpoint, "test")


def test_specs_need_a_directory_and_a_checkpoint(tiny_files):
    text_dir, checkpoint = tiny_files
    with pytest.raises(UserError, match="names no checkpoint"):
        parse_model_spec(f"albef:{text_dir}")
    with pytest.raises(UserError, match="does not exist"):
        parse_model_spec(f"albef:{text_dir}/nowhere@{checkpoint}")
    assert parse_model_spec(f"tcl:{text_dir}@{checkpoint}").name == str(text_dir.resolve())


# ---- reference equality -------------------------------------------------------------------------


def test_text_layers_equal_transformers_bert_on_the_same_weights(model):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=model.text_encoder.config.vocab_size, hidden_size=HIDDEN,
                                     num_hidden_layers=FUSION_LAYER, num_attention_heads=HEADS,
                                     intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS,
                                     hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    reference = transformers.BertModel(config, add_pooling_layer=False).eval()
    own = {k: v for k, v in model.text_encoder.state_dict().items() if ".crossattention." not in k
           and not k.startswith(f"encoder.layer.{FUSION_LAYER}.")}
    missing, unexpected = reference.load_state_dict(own, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing)
    tokens = model.tokenizer(["two red circles on the left", "a star"])
    with torch.no_grad():
        expected = reference(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        ours = model.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])
    real = tokens["attention_mask"].bool()
    assert torch.allclose(ours[real], expected[real], atol=1e-5)


def test_vit_equals_timm_on_the_same_weights(model):
    timm = pytest.importorskip("timm")
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=VIT_WIDTH, depth=VIT_DEPTH, num_heads=1, mlp_ratio=4, qkv_bias=True,
        num_classes=0, global_pool="token").eval()
    reference.load_state_dict(model.vision.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.vision.tokens(pixels), reference.forward_features(pixels), atol=1e-5)


def test_fusion_ignores_padding_and_reads_the_image(model):
    image = model.image_tokens(torch.rand(1, 3, 32, 32))
    short = model.itm_pair_logits(image, ["a red star"])
    padded = model.itm_pair_logits(image.expand(2, -1, -1), ["a red star", "two large blue circles at the top"])
    assert torch.allclose(short, padded[:1], atol=1e-5)
    other = model.itm_pair_logits(model.image_tokens(torch.rand(1, 3, 32, 32)), ["a red star"])
    assert not torch.allclose(short, other)


# ---- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_gives_cls_then_pieces_without_sep(tiny_files):
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tiny_files[0]), max_tokens=30)
    vocab = tokenizer.tokenizer.get_vocab()
    tokens = tokenizer(["Two RED circles, on the left!"])
    assert tokens["input_ids"][0].tolist() == [vocab[w] for w in ("[CLS]", "two", "red", "circles", "on", "the", "left")]
    assert vocab["[SEP]"] not in tokenizer(["a star", "three blue squares at the bottom"])["input_ids"]
    long = tokenizer([" ".join(["red"] * 50)])
    assert long["input_ids"].shape[1] == 30 and long["attention_mask"].sum() == 30  # [CLS] + 29 pieces


@pytest.mark.parametrize("raw, expected", [
    ("A man's dog, (running)!", "a mans dog running"),
    ("black-and-white photo/scan   here", "black and white photo scan here"),
    ("<person> waves", "person waves"),
])
def test_pre_caption_cleans_as_albef(raw, expected):
    assert pre_caption(raw) == expected
    assert pre_caption(" ".join(["w"] * 40)) == " ".join(["w"] * 30)


# ---- position embeddings -------------------------------------------------------------------------


def test_pos_embed_interpolation_is_the_identity_on_the_same_grid():
    pos_embed = torch.randn(1, 17, 8)
    assert torch.equal(interpolate_pos_embed(pos_embed, 4), pos_embed)


def test_pos_embed_interpolation_is_albefs_bicubic_rule():
    pos_embed = torch.randn(1, 5, 6)  # CLS + 2x2
    grid = pos_embed[:, 1:].reshape(1, 2, 2, 6).permute(0, 3, 1, 2)
    reference = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 6)
    resized = interpolate_pos_embed(pos_embed, 4)
    assert torch.equal(resized[:, :1], pos_embed[:, :1])
    assert torch.allclose(resized[:, 1:], reference)
    constant = torch.ones(1, 5, 6)
    assert torch.allclose(interpolate_pos_embed(constant, 4), torch.ones(1, 17, 6))


def test_a_checkpoint_of_another_grid_is_resampled_at_load(tmp_path):
    text_dir = write_text_dir(tmp_path / "bert")
    state = albef_state(_vocab_size(text_dir), "pretrain", grid=2)  # e.g. ALBEF's 256 px file into a 384 px model
    model = load_albef(text_dir, write_checkpoint(tmp_path / "ckpt.pth", state), "test", image_size=32)
    assert torch.allclose(model.vision.pos_embed, interpolate_pos_embed(state["visual_encoder.pos_embed"], 4))
    assert model.encode_image(torch.rand(1, 3, 32, 32)).shape == (1, 16)


# ---- features, training and export ----------------------------------------------------------------


def test_image_feature_is_vision_proj_of_the_vit_cls_and_only_the_vit_trains(model, tiny_files):
    state = read_state_dict(tiny_files[1])
    pixels = torch.rand(2, 3, 32, 32)
    cls = model.vision.tokens(model.normalize(pixels))[:, 0]
    expected = cls @ state["vision_proj.weight"].T + state["vision_proj.bias"]
    assert torch.allclose(model.encode_image(pixels), expected, atol=1e-6)
    assert set(model.vision.state_dict()) == set(vit_shapes())  # MAVA's bare visual_encoder layout
    model.encode_image(pixels).sum().backward()
    assert all(p.grad is not None for p in model.vision.parameters())
    assert model.vision_proj.weight.grad is None and not model.vision_proj.weight.requires_grad
    trainable = load_albef(tiny_files[0], tiny_files[1], "test", train_projection=True)
    assert {"vision_proj.weight", "vision_proj.bias"} <= set(trainable.vision.state_dict())
    assert torch.allclose(trainable.encode_image(pixels), expected, atol=1e-6)


def test_f_and_f_org_share_the_registered_projection_also_in_a_copy(model):
    import copy

    pixels = torch.rand(1, 3, 32, 32)
    before = model.encode_image(pixels).detach()
    clone = copy.deepcopy(model).to(torch.float64)  # .to() must reach the projection that F and F_org use
    assert clone.encode_image(pixels.double()).dtype == torch.float64
    assert clone.encode_image_original(pixels.double()).dtype == torch.float64
    with torch.no_grad():
        clone.vision_proj.bias.add_(1.0)
    assert torch.allclose(clone.encode_image(pixels.double()).float(), before + 1.0, atol=1e-5)
    assert torch.allclose(clone.encode_image_original(pixels.double()).float(), before + 1.0, atol=1e-5)
    assert torch.allclose(model.encode_image(pixels), before)  # the original is untouched


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_writes_bare_visual_encoder_keys_that_load_back_as_checkpoint(model, tiny_files, tmp_path, suffix):
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # a "fine-tuned" encoder (a random change: a constant one would vanish in the LayerNorms)
        model.vision.blocks[0].attn.proj.weight.add_(0.5 * torch.randn(VIT_WIDTH, VIT_WIDTH))
        tuned = model.encode_image(pixels)
    path = export_visual_encoder(model.vision, tmp_path / f"visual_encoder{suffix}")
    state = torch.load(path, weights_only=True) if suffix == ".pth" else read_state_dict(path)
    assert set(state) == set(vit_shapes())
    fresh = load_model(model.spec)
    assert not torch.allclose(fresh.encode_image(pixels), tuned)
    if suffix == ".safetensors":
        load_robust_vision(fresh, path)
    else:  # what platform.evaluate does with --checkpoint
        load_strict(fresh.vision, read_state_dict(path), source=str(path))
    assert torch.allclose(fresh.encode_image(pixels), tuned, atol=1e-6)
    assert torch.allclose(fresh.encode_image_original(pixels), model.encode_image_original(pixels))
    trainable = load_albef(tiny_files[0], tiny_files[1], "test", train_projection=True)
    with pytest.raises(UserError, match="vision_proj"):
        export_visual_encoder(trainable.vision, tmp_path / "x.pth")


def test_an_entailment_checkpoint_refuses_itm_by_name(tmp_path):
    text_dir, checkpoint = write_tiny_albef(tmp_path, "ve")
    model = load_model(f"albef:{text_dir}@{checkpoint}")
    assert model.entailment_logits(torch.rand(2, 3, 32, 32), ["a star", "a cross"]).shape == (2, 3)
    with pytest.raises(UserError, match="no itm_head"):
        model.itm_scores(torch.rand(1, 3, 32, 32), ["a star"])
