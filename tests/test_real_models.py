"""Real model kinds (open_clip files, transformers CLIP/BLIP folders) on tiny random configs, offline.

Every model here is a tiny random-initialised instance of the real class, saved to
tmp_path the way users get them (``save_pretrained``, ``torch.save``, safetensors,
a TorchScript archive like OpenAI's release); no test downloads anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval,
                          CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer)

from trainables.errors import UserError
from trainables.evaluation.rerank import OUTSIDE_TOP_K, itc_similarity, recall_from_scores, rerank_similarity
from trainables.models import load_model
from trainables.models.hf_blip import BlipCaptionVLP
from trainables.models.robust_checkpoint import load_robust_vision

SIZE = 32  # image side in pixels for every tiny model
OPEN_CLIP_ARCH = "MavaTest-Tiny-ViT"
WORDS = ["a", "picture", "of", "dog", "cat", "red", "blue", "on", "the", "grass", "man", "horse"]
CLIP_MEAN, CLIP_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ---- writing tiny models the way users receive them ------------------------------------------


def write_clip_dir(path: Path, with_tokenizer: bool = True) -> Path:
    """A transformers CLIPModel folder: weights, config, a char-level CLIP BPE tokenizer, a processor config."""
    path.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(path)
    if with_tokenizer:
        (path / "vocab.json").write_text(json.dumps(vocab))
        (path / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt")).save_pretrained(path)
    return path


def write_blip_dir(path: Path, model_class) -> Path:
    """A transformers BLIP folder (retrieval or captioning) with a tiny BERT tokenizer; no processor config."""
    path.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"] + WORDS
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    # BLIP's tokenizer: BERT's plus [DEC] as bos (decoder start) and [ENC] (ITM's first token).
    tokenizer = BertTokenizer.from_pretrained(path, bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=40, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=8),
        projection_dim=16, image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def open_clip_arch(tmp_path_factory) -> str:
    """A tiny named open_clip architecture, registered from a JSON config like the built-in ones."""
    config = {"embed_dim": 16, "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("open_clip_config") / f"{OPEN_CLIP_ARCH}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return OPEN_CLIP_ARCH


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, open_clip_arch) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    clip = open_clip.create_model(open_clip_arch, pretrained=None).eval()
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(root / "open_clip.safetensors"))
    torch.save(state, root / "open_clip.pt")
    # OpenAI's release format: a TorchScript archive of a QuickGELU model.
    openai = open_clip.create_model(open_clip_arch, pretrained=None, force_quick_gelu=True).eval()
    with torch.no_grad():
        traced = torch.jit.trace_module(openai, {"encode_image": (torch.rand(1, 3, SIZE, SIZE),)}, check_trace=False)
    torch.jit.save(traced, str(root / "openai.pt"))
    return {
        "open_clip.safetensors": root / "open_clip.safetensors",
        "open_clip.pt": root / "open_clip.pt",
        "openai.pt": root / "openai.pt",
        "hf-clip": write_clip_dir(root / "hf-clip"),
        "hf-blip-itr": write_blip_dir(root / "hf-blip-itr", BlipForImageTextRetrieval),
        "hf-blip-cap": write_blip_dir(root / "hf-blip-cap", BlipForConditionalGeneration),
    }


SPECS = {
    "open_clip-safetensors": lambda f: f"open_clip:{OPEN_CLIP_ARCH}@{f['open_clip.safetensors']}",
    "open_clip-pt": lambda f: f"open_clip:{OPEN_CLIP_ARCH}@{f['open_clip.pt']}",
    "open_clip-openai-torchscript": lambda f: f"open_clip:{OPEN_CLIP_ARCH}@{f['openai.pt']}",
    "hf-clip": lambda f: f"hf-clip:{f['hf-clip']}",
    "hf-blip-itr": lambda f: f"hf-blip-itr:{f['hf-blip-itr']}",
    "hf-blip-cap": lambda f: f"hf-blip-cap:{f['hf-blip-cap']}",
}


def _snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


# ---- every kind: load, encode, train one step, save, reload ------------------------------------


@pytest.mark.parametrize("kind", list(SPECS))
def test_each_kind_loads_encodes_trains_its_vision_only_and_reloads_the_robust_checkpoint(kind, model_files, tmp_path):
    spec = SPECS[kind](model_files)
    model = load_model(spec)
    assert model.image_size == SIZE
    pixels = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        image_features = model.encode_image(pixels)
    assert image_features.ndim == 2 and image_features.shape[0] == 2 and torch.isfinite(image_features).all()
    if isinstance(model, BlipCaptionVLP):
        assert model.has_text_encoder is False
        with pytest.raises(UserError, match="no text encoder.*Eq. 8"):
            model.encode_text(["a dog"])
    else:
        with torch.no_grad():
            text_features = model.encode_text(["a dog on the grass", "a red cat", "the man"])
        assert text_features.shape == (3, image_features.shape[1])

    text_before, original_before = _snapshot(model.text_parameters()), _snapshot(model.vision_original.parameters())
    vision_before = _snapshot(model.vision.parameters())
    model.vision.train()
    optimizer = torch.optim.SGD([p for p in model.vision.parameters() if p.requires_grad], lr=0.5)
    loss = model.encode_image(pixels).pow(2).mean()
    loss.backward()
    optimizer.step()
    model.vision.eval()
    assert any(not torch.equal(a, b) for a, b in zip(vision_before, model.vision.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(text_before, model.text_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(original_before, model.vision_original.parameters()))

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    trained = {k: v.detach().contiguous() for k, v in model.vision.state_dict().items()}
    save_file(trained, str(checkpoint / "vision.safetensors"))
    fresh = load_model(spec)
    load_robust_vision(fresh, checkpoint)
    assert all(torch.equal(fresh.vision.state_dict()[k], v) for k, v in trained.items())
    # F_org stays the base model's encoder.
    assert all(torch.equal(a, b) for a, b in zip(original_before, fresh.vision_original.parameters()))
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(pixels), model.encode_image(pixels))


def test_openai_torchscript_weights_load_with_quickgelu_and_match_the_archive(model_files):
    model = load_model(SPECS["open_clip-openai-torchscript"](model_files))
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.vision.modules())
    archive = torch.jit.load(str(model_files["openai.pt"]), map_location="cpu")
    pixels = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), archive.encode_image(model.normalize(pixels)), atol=1e-5)


def test_hf_models_take_mean_and_std_from_the_processor_config_else_openai_clip(model_files):
    assert load_model(SPECS["hf-clip"](model_files)).pixel_mean.flatten().tolist() == pytest.approx(CLIP_MEAN)
    blip = load_model(SPECS["hf-blip-itr"](model_files))  # no processor config saved
    assert blip.pixel_mean.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert blip.pixel_std.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_STD)


# ---- BLIP: ITM re-ranking and captioning --------------------------------------------------------


def test_blip_itm_scores_every_image_with_every_text(model_files):
    model = load_model(SPECS["hf-blip-itr"](model_files))
    with torch.no_grad():
        scores = model.itm_scores(torch.rand(2, 3, SIZE, SIZE), ["a dog", "a red cat on the grass", "the man"])
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()


def test_blip_reranking_changes_the_ranking_only_within_the_contrastive_top_k(model_files):
    model = load_model(SPECS["hf-blip-itr"](model_files))
    torch.manual_seed(1)
    images = torch.rand(4, 3, SIZE, SIZE)
    captions = ["a dog", "a cat", "a red dog", "the blue cat", "a man on a horse", "the grass", "a picture of a man", "red grass"]
    with torch.no_grad():
        similarity = itc_similarity(model.encode_image(images), model.encode_text(captions))
        scores = rerank_similarity(model, images, captions, similarity, k_test=3)
        all_pairs = model.itm_scores(images, captions)
    for image in range(4):
        top = set(similarity[image].topk(3).indices.tolist())
        rescored = set((scores.i2t[image] != OUTSIDE_TOP_K).nonzero().flatten().tolist())
        assert rescored == top  # the candidate set is ITC's top-k; everything else stays at the bottom
        for t in top:  # BLIP's score: ITC cosine + ITM match logit
            assert scores.i2t[image, t] == pytest.approx(float(similarity[image, t] + all_pairs[image, t]), abs=1e-4)
    for caption in range(len(captions)):
        top = set(similarity[:, caption].topk(3).indices.tolist())
        assert set((scores.t2i[:, caption] != OUTSIDE_TOP_K).nonzero().flatten().tolist()) == top
    text_to_image = [0, 0, 1, 1, 2, 2, 3, 3]
    # Recall@1 against an oracle that ranks by hand, with BLIP's rule written out pair by pair
    # (k_test=100 re-scores every pair; a smaller k_test leaves the rest at OUTSIDE_TOP_K). The
    # random tiny BLIP gives every random image nearly the same features, so the ITC scores are
    # spread by hand: the two directions' candidate sets then differ, as on real data.
    spread = torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    outcomes = set()
    for k_test in (1, 2, 3, 100):
        recalls = recall_from_scores(rerank_similarity(model, images, captions, spread, k_test=k_test), torch.tensor(text_to_image))
        expected = _oracle_recall(spread, all_pairs, text_to_image, k_test)
        assert {key: recalls[key] for key in expected} == pytest.approx(expected)
        outcomes.add(tuple(expected.values()))
    assert len(outcomes) > 1  # k_test changes the answer here, so the comparison tells candidate rules apart


def _oracle_recall(similarity, itm, text_to_image, k_test) -> dict[str, float]:
    """TR@1/5 and IR@1/5 ranked by hand with BLIP's rule, pair by pair: inside a query's ITC top-k_test
    the score is ITC + ITM, outside it OUTSIDE_TOP_K; a ground truth outside is a miss; a tie is a miss."""
    num_images, num_texts = similarity.shape

    def rank(scores: dict[int, float], own: float, wrong) -> float:
        return float("inf") if own <= OUTSIDE_TOP_K else sum(1 for j in wrong if scores[j] >= own)

    image_ranks, caption_ranks = [], []
    for image in range(num_images):
        top = set(similarity[image].topk(min(k_test, num_texts)).indices.tolist())
        scores = {t: float(similarity[image, t] + itm[image, t]) if t in top else OUTSIDE_TOP_K for t in range(num_texts)}
        best_own = max(scores[t] for t in scores if text_to_image[t] == image)
        image_ranks.append(rank(scores, best_own, [t for t in scores if text_to_image[t] != image]))
    for caption in range(num_texts):
        top = set(similarity[:, caption].topk(min(k_test, num_images)).indices.tolist())
        scores = {i: float(similarity[i, caption] + itm[i, caption]) if i in top else OUTSIDE_TOP_K for i in range(num_images)}
        own = text_to_image[caption]
        caption_ranks.append(rank(scores, scores[own], [i for i in scores if i != own]))
    return {f"{side}{k}": 100.0 * sum(r < k for r in ranks) / len(ranks)
            for side, ranks in (("tr", image_ranks), ("ir", caption_ranks)) for k in (1, 5)}


def test_blip_captioner_generates_one_caption_per_image_from_its_trainable_vit(model_files):
    model = load_model(SPECS["hf-blip-cap"](model_files))
    pixels = torch.rand(2, 3, SIZE, SIZE)
    unconditional = model.generate_captions(pixels, max_length=8, min_length=1, num_beams=1, prompt="")
    prompted = model.generate_captions(pixels, max_length=8, min_length=1, num_beams=2)
    assert len(unconditional) == len(prompted) == 2 and all(isinstance(c, str) for c in unconditional + prompted)
    assert not any(c.startswith("a picture of") for c in prompted)  # the prompt is stripped, as BLIP does


# ---- bad inputs: one clear UserError each ------------------------------------------------------------


def test_a_directory_of_another_kind_says_what_it_holds_and_which_kind_to_use(model_files):
    with pytest.raises(UserError, match=r"holds a CLIPModel .*use hf-clip:"):
        load_model(f"hf-blip-itr:{model_files['hf-clip']}")
    with pytest.raises(UserError, match=r"holds a BlipForConditionalGeneration .*use hf-blip-cap:"):
        load_model(f"hf-blip-itr:{model_files['hf-blip-cap']}")
    with pytest.raises(UserError, match=r"holds a BlipForImageTextRetrieval .*use hf-blip-itr:"):
        load_model(f"hf-clip:{model_files['hf-blip-itr']}")


@pytest.mark.parametrize("spec, message", [
    ("hf-clip:/nonexistent/clip-dir", "model directory /nonexistent/clip-dir .* does not exist"),
    ("hf-blip-itr", "needs a model directory"),
    ("open_clip:ViT-B-16-SigLIP", "needs a download"),
])
def test_bad_specs_of_the_new_kinds_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        load_model(spec)


def test_hf_specs_take_no_weights_file(model_files):
    with pytest.raises(UserError, match=r"takes no '@weights'.*load_robust_vision"):
        load_model(f"hf-clip:{model_files['hf-clip']}@{model_files['open_clip.pt']}")


def test_a_folder_without_config_or_tokenizer_is_refused(tmp_path, model_files):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_model(f"hf-clip:{tmp_path / 'empty'}")
    no_tokenizer = write_clip_dir(tmp_path / "no-tokenizer", with_tokenizer=False)
    with pytest.raises(UserError, match="has no tokenizer files"):
        load_model(f"hf-clip:{no_tokenizer}")


def test_hf_weights_that_do_not_match_config_name_the_keys(tmp_path, model_files):
    broken = tmp_path / "clip-two-layers"
    shutil.copytree(model_files["hf-clip"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 2  # the weights have one layer
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"do not match its config.json.*missing.*vision_model\.encoder\.layers\.1\."):
        load_model(f"hf-clip:{broken}")


def test_open_clip_weights_of_another_architecture_name_the_keys(tmp_path, open_clip_arch):
    other = open_clip.create_model(open_clip_arch, pretrained=None).state_dict()
    other = {k.replace("resblocks.0", "resblocks.7"): v.contiguous() for k, v in other.items()}
    path = tmp_path / "other.safetensors"
    save_file(other, str(path))
    with pytest.raises(UserError, match=r"do not match the architecture.*transformer\.resblocks\.0\."):
        load_model(f"open_clip:{open_clip_arch}@{path}")


def test_a_tampered_robust_checkpoint_is_refused(tmp_path, model_files):
    from trainables.models.robust_checkpoint import file_sha256

    model = load_model(SPECS["hf-clip"](model_files))
    weights = tmp_path / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in model.vision.state_dict().items()}, str(weights))
    (tmp_path / "card.json").write_text(json.dumps({"sha256": file_sha256(weights), "base_model": model.spec}))
    load_robust_vision(model, weights)  # the card vouches for the file
    tampered = {k: v.contiguous() + 1e-3 for k, v in model.vision.state_dict().items()}
    save_file(tampered, str(weights))
    with pytest.raises(UserError, match="does not match the sha256 in .*card.json"):
        load_robust_vision(model, tmp_path)


def test_a_robust_checkpoint_of_another_base_model_names_the_keys(tmp_path, model_files):
    blip = load_model(SPECS["hf-blip-itr"](model_files))
    save_file({k: v.contiguous() for k, v in blip.vision.state_dict().items()}, str(tmp_path / "vision.safetensors"))
    clip = load_model(SPECS["hf-clip"](model_files))
    with pytest.raises(UserError, match=r"do not match the architecture.*missing"):
        load_robust_vision(clip, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no vision.safetensors"):
        load_robust_vision(clip, tmp_path / "empty")
