"""ALBEF's retrieval protocol (ITC ranking, ITM re-scoring of the top-k_test) and fine-tuning of its ViT only."""

from __future__ import annotations

import itertools

import pytest
import torch
from albef_fakes import vit_shapes, write_tiny_albef
from safetensors.torch import load_file

from trainables.config import TrainConfig
from trainables.data.synthetic import SyntheticWorld
from trainables.evaluation.rerank import OUTSIDE_TOP_K, RerankedScores, recall_from_scores, rerank_similarity
from trainables.models import load_model
from trainables.models.albef import AlbefVLP
from trainables.train import run_training


@pytest.fixture(scope="module")
def albef_spec(tmp_path_factory) -> str:
    text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("albef-retrieval"), seed=5)
    return f"albef:{text_dir}@{checkpoint}"


def _itm_decided_case(model: AlbefVLP, margin: float = 0.5):
    """Two images and two captions that the ITM head matches one way round, in both directions, by ``margin``.

    Searched among a few synthetic images and captions with the (random) model's own ITM logits.
    """
    world = SyntheticWorld("test", 8, image_size=32, seed=0)
    pool_images = torch.stack([item.image for item in world])
    pool = [caption for item in SyntheticWorld("test", 12, image_size=32, seed=1) for caption in item.captions[:2]]
    with torch.no_grad():
        scores = model.itm_scores(pool_images, pool)
    for i, j in itertools.permutations(range(len(world)), 2):
        for a, b in itertools.permutations(range(len(pool)), 2):
            pair = scores[[i, j]][:, [a, b]]  # caption a should go with image i, caption b with image j
            diagonal = pair.diagonal()
            if (diagonal - pair.flip(1).diagonal()).min() > margin and (diagonal - pair.flip(0).diagonal()).min() > margin:
                return pool_images[[i, j]], [pool[a], pool[b]], pair
    raise AssertionError("no images and captions that the ITM head separates: raise the itm_head scale")


def test_albef_declares_itm_alone_as_its_rescoring_rule(albef_spec):
    assert load_model(albef_spec).itm_scoring == "itm"  # ALBEF/TCL Retrieval.py; BLIP adds the ITC similarity


def test_itm_rescoring_of_the_top_k_changes_the_top_1(albef_spec):
    model = load_model(albef_spec)
    with torch.no_grad():
        model.itm_head.weight.mul_(20.0)  # a decisive ITM head, as after ITM training
    images, captions, itm = _itm_decided_case(model)
    text_to_image = torch.tensor([0, 1])
    # ITC prefers the wrong caption for each image and the wrong image for each caption
    similarity = torch.tensor([[0.1, 0.3], [0.3, 0.1]])
    itc_only = recall_from_scores(RerankedScores(i2t=similarity, t2i=similarity), text_to_image)
    assert itc_only["tr1"] == 0.0 and itc_only["ir1"] == 0.0
    # ALBEF's rule by hand: candidates scored by the ITM logit alone
    assert recall_from_scores(RerankedScores(i2t=itm, t2i=itm), text_to_image)["tr1"] == 100.0
    reranked = rerank_similarity(model, images, captions, similarity, k_test=2)
    metrics = recall_from_scores(reranked, text_to_image)
    assert metrics["tr1"] == 100.0 and metrics["ir1"] == 100.0
    # with k_test = 1 only the ITC top-1 is re-scored: the ITM head cannot rescue the ground truth
    narrow = rerank_similarity(model, images, captions, similarity, k_test=1)
    assert (narrow.i2t == OUTSIDE_TOP_K).sum() == 2 and (narrow.t2i == OUTSIDE_TOP_K).sum() == 2
    assert recall_from_scores(narrow, text_to_image)["tr1"] == 0.0


def test_fine_tuning_albef_changes_only_the_vit_and_checkpoints_in_mavas_layout(albef_spec, tmp_path):
    model = load_model(albef_spec)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("vision.")}
    vit_before = {n: p.clone() for n, p in model.vision.named_parameters()}
    config = TrainConfig(model=albef_spec, defense="mava", train_data="synthetic:train,n=8", eval_data="synthetic:test,n=4",
                         epochs=1, batch_size=4, pgd_steps=1, eval_every=0, eval_eps=("4/255",), N=2, M=3, lr=1e-2)
    checkpoints = []
    run_training(config, lambda metrics, checkpoint: checkpoints.append(checkpoint), tmp_path, model=model)
    assert "vision_proj.weight" in frozen_before  # F(v)'s projection is outside the trained tower ...
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not n.startswith("vision."))
    assert any(not torch.equal(p, vit_before[n]) for n, p in model.vision.named_parameters())
    assert set(load_file(str(checkpoints[-1] / "vision.safetensors"))) == set(vit_shapes())  # bare visual_encoder keys
