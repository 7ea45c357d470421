"""The pieces of ``tiny-albef``'s and ``tiny-tcl``'s pretraining on a tiny random configuration.

The full pretraining is not run here (minutes); these check what it is made of: the
world's vocabulary covers its captions, BERT's masking leaves [CLS] and padding alone,
every ALBEF and TCL term is finite and reaches every weight that is saved, a same-scene
item is never a negative, TCL's terms reward agreeing views, and both kinds load
through ``load_model`` from a weights file (random, never pretrained here).
"""

from __future__ import annotations

import torch

from trainables.data.synthetic import SyntheticWorld
from trainables.data.synthetic_ve import DOMAINS, SyntheticEntailment
from trainables.data.synthetic_vg import SyntheticGrounding
from trainables.models.albef import AlbefNet
from trainables.models.albef_text import AlbefTokenizer, load_bert_tokenizer
import copy
from dataclasses import replace

import pytest
from safetensors.torch import save_file

from trainables.models import load_model, model_kind
from trainables.models.albef import AlbefVLP, TclVLP
from trainables.models.tiny_albef import (AttributeHeads, load_tiny_albef, TINY_TCL, TinyAlbefConfig, MlmHead, _contrast, _hard_negatives, _mask_tokens,
                                          albef_losses, bert_config, global_local_loss, model_dir, pretrain, scene_ids, tcl_losses,
                                          supervised_start, train_split, vit_config, warm_start, write_text_files)

SMALL = TinyAlbefConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1, fusion_layers=1, embed_dim=8)


def test_the_world_vocabulary_covers_every_caption_hypothesis_and_expression(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path), max_tokens=SMALL.max_tokens)
    captions = [caption for split in ("train", "test") for item in SyntheticWorld(split, 40, seed=3) for caption in item.captions]
    hypotheses = [SyntheticEntailment("train", 60, seed=3)[i].hypothesis for i in range(60)]
    grounding = SyntheticGrounding("test", 40, seed=3)
    expressions = [grounding[i].expression for i in range(len(grounding))]
    assert any("shape" in e.split() for e in expressions) and any("wood" in h for h in hypotheses)  # the once-missing words
    ids = tokenizer(captions + hypotheses + expressions)["input_ids"]
    assert tokenizer.tokenizer.unk_token_id not in ids
    assert ids.shape[1] <= SMALL.max_tokens


def test_masking_never_touches_cls_or_padding(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path))
    tokens = tokenizer(["two red stars at the top over a white background", "a cross"])
    masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, 0.9, 80, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[tokens["attention_mask"] == 0].any()
    assert chosen.any() and torch.equal(labels[chosen], tokens["input_ids"][chosen])
    assert torch.equal(masked[~chosen], tokens["input_ids"][~chosen])


def test_every_albef_term_is_finite_and_trains_every_saved_weight(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path))
    vocab_size = len(tokenizer.tokenizer.get_vocab())
    net = AlbefNet(vit_config(SMALL), bert_config(SMALL, vocab_size), frozenset({"itm"}), SMALL.embed_dim)
    mlm = MlmHead(SMALL.text_width, vocab_size)
    world = SyntheticWorld("train", 4, seed=0)
    tokens = tokenizer([item.captions[0] for item in world])
    masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, 0.5, vocab_size, torch.Generator().manual_seed(1))
    terms = albef_losses(net, mlm, torch.stack([item.image for item in world]), tokens, masked, labels, torch.Generator().manual_seed(2))
    terms.pop("features")
    assert set(terms) == {"loss", "itc", "itm", "mlm"} and all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    silent = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == [], silent  # ITC, ITM (fusion + head) and MLM together reach every saved weight


def test_the_warm_start_trains_the_unimodal_encoders_and_leaves_the_fusion_alone(tmp_path):
    net, tokenizer = _small_net(tmp_path)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    config = replace(SMALL, warm_images=64, warm_epochs=1, warm_batch_size=16, train_images=32)
    world, pieces = train_split(config, tokenizer)
    heads = AttributeHeads(SMALL.vision_width)
    heads_before = copy.deepcopy(heads.state_dict())
    warm_start(net, heads, AttributeHeads.labels(world), config, tokenizer, world, pieces, progress=False)
    moved = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    fusion = {name for name in before if name.startswith("itm_head") or name.startswith(f"text_encoder.encoder.layer.{SMALL.text_layers}.")}
    assert fusion and not moved & fusion
    for prefix in ("visual_encoder.", "vision_proj.", "text_proj.", "text_encoder.embeddings.", "text_encoder.encoder.layer.0.", "temp"):
        assert any(name.startswith(prefix) for name in moved), prefix
    assert all(not torch.equal(value, heads_before[name]) for name, value in heads.state_dict().items())  # attribute_weight 1


def test_without_attribute_weight_the_heads_leave_the_warm_start_alone(tmp_path):
    net, tokenizer = _small_net(tmp_path)
    config = replace(SMALL, warm_images=32, warm_epochs=1, warm_batch_size=16, train_images=32, attribute_weight=0.0)
    world, pieces = train_split(config, tokenizer)
    heads = AttributeHeads(SMALL.vision_width)
    heads_before = copy.deepcopy(heads.state_dict())
    warm_start(net, heads, AttributeHeads.labels(world), config, tokenizer, world, pieces, progress=False)
    assert all(torch.equal(value, heads_before[name]) for name, value in heads.state_dict().items())


def test_the_attribute_heads_read_each_scenes_own_attributes():
    world = SyntheticWorld("train", 30, seed=2)
    labels = AttributeHeads.labels(world)
    width = sum(len(values) for values in DOMAINS.values())
    heads = AttributeHeads(width)
    assert set(labels) == set(heads.heads) == {"shape", "colour", "size", "count", "position", "background"}
    # A CLS that is the one-hot code of every attribute, and heads that read their own slice of it.
    cls, offset = torch.zeros(30, width), 0
    with torch.no_grad():
        for name, values in labels.items():
            classes = heads.heads[name].out_features
            assert values.shape == (30,) and 0 <= int(values.min()) and int(values.max()) < classes
            assert len({getattr(scene, name) for scene in world.scenes}) == len(set(values.tolist()))  # one class per value
            cls[torch.arange(30), offset + values] = 1.0
            heads.heads[name].weight.zero_()
            heads.heads[name].weight[:, offset:offset + classes] = 20 * torch.eye(classes)
            heads.heads[name].bias.zero_()
            offset += classes
    assert heads(cls, labels) < 1e-3  # the scene's own attributes
    assert heads(cls, {name: (values + 1) % heads.heads[name].out_features for name, values in labels.items()}) > 6 * 19


def test_the_stages_share_one_rendered_and_tokenised_train_split(tmp_path):
    # Every stage reads a prefix of one world; it must be the world the stage would have built alone.
    _, tokenizer = _small_net(tmp_path)
    world, pieces = train_split(replace(SMALL, warm_images=12, train_images=20), tokenizer)
    alone = SyntheticWorld("train", 12, image_size=SMALL.image_size, seed=SMALL.seed)
    assert len(world) == 20 and torch.equal(world.images[:12], alone.images) and world.captions[:12] == alone.captions
    assert torch.equal(scene_ids(world)[:12][:, None] == scene_ids(world)[:12][None], scene_ids(alone)[:, None] == scene_ids(alone)[None])
    which = torch.tensor([4, 0, 2])
    batch = [world.captions[i][w] for i, w in zip([3, 11, 0], which.tolist())]
    from_pieces = tokenizer.pad([pieces[i][w] for i, w in zip([3, 11, 0], which.tolist())])
    assert all(torch.equal(from_pieces[key], tokenizer(batch)[key]) for key in ("input_ids", "attention_mask"))


def test_the_supervised_image_stage_trains_the_vit_alone(tmp_path):
    net, tokenizer = _small_net(tmp_path)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    config = replace(SMALL, warm_images=64, warm_batch_size=16, supervised_steps=3, train_images=32)
    world, _ = train_split(config, tokenizer)
    supervised_start(net, AttributeHeads(SMALL.vision_width), AttributeHeads.labels(world), config, world, progress=False)
    moved = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    assert moved == {name for name in before if name.startswith("visual_encoder.")}


@pytest.mark.parametrize("objectives", ["albef", "tcl"])
def test_every_pretraining_stage_runs_and_the_result_loads_in_albefs_layout(tmp_path, monkeypatch, objectives):
    monkeypatch.setenv("MAVA_CACHE_DIR", str(tmp_path / "cache"))
    config = replace(SMALL, objectives=objectives, supervised_steps=2, warm_images=32, warm_epochs=1, warm_batch_size=16,
                     train_images=32, epochs=1, batch_size=16)
    write_text_files(tmp_path, config)
    state = pretrain(config, tmp_path, progress=False)
    assert all(torch.isfinite(value).all() for value in state.values())
    save_file(state, str(tmp_path / "weights.safetensors"))
    model = load_tiny_albef(f"tiny-{objectives}", str(tmp_path / "weights.safetensors"), config)
    assert model.family == objectives and model.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, config.embed_dim)


def test_the_cache_is_content_addressed():
    assert model_dir(SMALL) != model_dir(TinyAlbefConfig()) and model_dir(SMALL) == model_dir(TinyAlbefConfig(**vars(SMALL)))
    assert model_dir(TINY_TCL).name.startswith("tiny-tcl-") and model_dir(TinyAlbefConfig()).name.startswith("tiny-albef-")


def _small_net(tmp_path):
    write_text_files(tmp_path, SMALL)
    tokenizer = AlbefTokenizer(load_bert_tokenizer(tmp_path))
    vocab_size = len(tokenizer.tokenizer.get_vocab())
    torch.manual_seed(0)
    return AlbefNet(vit_config(SMALL), bert_config(SMALL, vocab_size), frozenset({"itm"}), SMALL.embed_dim), tokenizer


def test_scene_ids_are_equal_exactly_for_equal_captions():
    world = SyntheticWorld("train", 400, seed=0)
    ids = scene_ids(world)
    same_ids = ids[:, None] == ids[None, :]
    same_captions = torch.tensor([[a == b for b in world.captions] for a in world.captions])
    assert torch.equal(same_ids, same_captions) and (same_ids.sum() > len(world))  # 400 of 3600 scenes: some repeat


def test_a_same_scene_item_is_never_a_hard_negative():
    # Items 0-2 share a scene, 3-4 another, 5 is alone; the similarities favour the same-scene items strongly.
    scene = torch.tensor([0, 0, 0, 1, 1, 2])
    same_scene = scene[:, None] == scene[None, :]
    sim = torch.where(same_scene, torch.tensor(50.0), torch.tensor(0.0))
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([_hard_negatives(sim, same_scene, generator) for _ in range(200)])  # (200, 6)
    assert not same_scene[torch.arange(6), drawn].any()
    assert set(drawn[:, 0].tolist()) == {3, 4, 5}  # every other-scene item can still be drawn


def test_itc_leaves_same_scene_items_out_of_the_negatives():
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    keys[1] = query[0]  # item 1 shares item 0's scene and matches query 0 best: a false negative if kept
    same_scene = torch.eye(4, dtype=torch.bool)
    same_scene[0, 1] = same_scene[1, 0] = True
    temp = torch.tensor(0.1)
    logits = query @ keys.T / temp
    expected = logits.clone()
    expected[0, 1] = expected[1, 0] = float("-inf")
    masked = _contrast(query, keys, temp, same_scene)
    assert torch.isclose(masked, torch.nn.functional.cross_entropy(expected, torch.arange(4)))
    assert masked < _contrast(query, keys, temp, torch.eye(4, dtype=torch.bool))  # the kept false negative costs


def _tcl_batch(tmp_path, count=6):
    net, tokenizer = _small_net(tmp_path)
    world = SyntheticWorld("train", count, seed=0)
    pixels = torch.stack([item.image for item in world])
    tokens = tokenizer([item.captions[0] for item in world])
    view_tokens = tokenizer([item.captions[1] for item in world])
    return net, tokenizer, world, pixels, tokens, view_tokens


def test_every_tcl_term_is_finite_and_the_total_trains_every_saved_weight(tmp_path):
    net, tokenizer, world, pixels, tokens, view_tokens = _tcl_batch(tmp_path)
    vocab_size = len(tokenizer.tokenizer.get_vocab())
    mlm = MlmHead(SMALL.text_width, vocab_size)
    masked, labels = _mask_tokens(tokens["input_ids"], tokens["attention_mask"], tokenizer, 0.5, vocab_size, torch.Generator().manual_seed(1))
    same_scene = torch.eye(len(world), dtype=torch.bool)
    terms = albef_losses(net, mlm, pixels, tokens, masked, labels, torch.Generator().manual_seed(2), same_scene)
    image_feat, text_feat = terms.pop("features")
    ema = copy.deepcopy(net).requires_grad_(False)
    tcl = tcl_losses(net, ema, image_feat, text_feat, pixels.flip(-1), view_tokens, same_scene)
    assert set(tcl) == {"i2i", "t2t", "g2l_image", "g2l_text"} and all(torch.isfinite(v) for v in tcl.values())
    (terms["loss"] + sum(tcl.values())).backward()
    silent = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == [], silent
    assert all(p.grad is None for p in ema.parameters())  # the momentum side gets no gradient


def test_tcl_intra_modal_terms_are_lower_for_identical_views_than_for_shuffled_ones(tmp_path):
    net, _, world, pixels, tokens, _ = _tcl_batch(tmp_path)
    net.eval()
    same_scene = torch.eye(len(world), dtype=torch.bool)
    with torch.no_grad():
        image_feat = torch.nn.functional.normalize(net.vision_proj(net.visual_encoder.tokens(pixels)[:, 0]), dim=-1)
        text_feat = torch.nn.functional.normalize(net.text_proj(net.text_encoder.text(tokens["input_ids"], tokens["attention_mask"])[:, 0]), dim=-1)
        # The momentum encoder equal to the online one: identical views give identical features.
        same = tcl_losses(net, net, image_feat, text_feat, pixels, tokens, same_scene)
        shuffle = torch.roll(torch.arange(len(world)), 1)
        shuffled = tcl_losses(net, net, image_feat, text_feat, pixels[shuffle],
                              {key: value[shuffle] for key, value in tokens.items()}, same_scene)
    assert same["i2i"] < shuffled["i2i"] and same["t2t"] < shuffled["t2t"]


def test_global_local_loss_matches_its_definition_on_a_hand_case():
    torch.manual_seed(1)
    local = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    global_ = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    temp = torch.tensor(0.5)
    # By hand: local l of item n against n's global (positive) and every valid local of the others (negatives).
    losses = []
    for n in range(3):
        terms = []
        for l in range(2):
            if not mask[n, l]:
                continue
            positive = local[n, l] @ global_[n] / temp
            negatives = [local[m, k] @ global_[n] / temp for m in range(3) for k in range(2) if m != n and mask[m, k]]
            terms.append(-torch.log_softmax(torch.stack([positive, *negatives]), dim=0)[0])
        losses.append(torch.stack(terms).mean())
    assert torch.isclose(global_local_loss(local, global_, temp, mask), torch.stack(losses).mean())


@pytest.mark.parametrize(("kind", "model_class", "family"), [("tiny-albef", AlbefVLP, "albef"), ("tiny-tcl", TclVLP, "tcl")])
def test_tiny_fusion_kinds_load_a_weights_file_through_load_model(tmp_path, monkeypatch, kind, model_class, family):
    monkeypatch.setenv("MAVA_CACHE_DIR", str(tmp_path / "cache"))  # the text files are written here; nothing pretrains
    config = TINY_TCL if kind == "tiny-tcl" else TinyAlbefConfig()
    write_text_files(tmp_path / "text", config)
    vocab_size = len(AlbefTokenizer(load_bert_tokenizer(tmp_path / "text")).tokenizer.get_vocab())
    torch.manual_seed(3)
    net = AlbefNet(vit_config(config), bert_config(config, vocab_size), frozenset({"itm"}), config.embed_dim)
    weights = tmp_path / "random.safetensors"
    save_file({key: value.contiguous() for key, value in net.state_dict().items()}, str(weights))
    assert model_kind(kind).family == family and not model_kind(kind).needs_name and model_kind(kind).model_class is model_class
    model = load_model(f"{kind}@{weights}")
    assert type(model) is model_class and model.family == family
    assert torch.equal(model.itm_head.weight, net.itm_head.weight)
    assert model.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, config.embed_dim)
    assert model.itm_scores(torch.rand(2, 3, 32, 32), ["a red circle", "two blue stars"]).shape == (2, 2)


def test_every_embedded_kind_is_pinned_by_a_sweep():
    # A kind without a name or weights file is pretrained per machine: resolve_model must pin it, or each worker
    # would load (or pretrain) its own copy.
    from trainables.models import MODEL_KINDS
    from trainables.models.embedded import EMBEDDED_WEIGHTS

    assert {"tiny-albef", "tiny-tcl"} <= {kind for kind, spec in MODEL_KINDS.items() if not spec.needs_name} == set(EMBEDDED_WEIGHTS)
