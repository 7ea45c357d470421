"""tiny-albef-ve's fine-tuning (ALBEF's VE recipe: a fresh cls_head, cross-entropy, whole model) on a random tiny ALBEF.

The real embedded base (tiny-albef) is never pretrained here: a random retrieval checkpoint from
``albef_fakes`` stands in for it, in a temporary cache folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from albef_fakes import albef_state, write_text_dir
from safetensors.torch import load_file, save_file

from trainables.models import load_model, model_kind
from trainables.models.albef import load_albef
from trainables.models.albef_checkpoint import inference_state
from trainables.models.tiny_albef_ve import WEIGHTS_FILE, VeRecipe, competence, ensure_finetuned, finetuned_dir, finetuned_weights
from trainables.tasks import Task

RECIPE = VeRecipe(train_pairs=12, epochs=3, batch_size=12, lr=3e-3)


@pytest.fixture()
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MAVA_CACHE_DIR", str(tmp_path / "cache"))
    directory = write_text_dir(tmp_path / "tiny-albef")
    vocab_size = len((directory / "vocab.txt").read_text(encoding="utf-8").split())
    save_file(inference_state(albef_state(vocab_size, "retrieval")), str(directory / WEIGHTS_FILE))
    return directory


def test_fine_tuning_gives_a_cached_ve_model_in_albefs_layout_whose_loss_falls(base_dir):
    directory = ensure_finetuned(base_dir, RECIPE, progress=False)
    assert directory == finetuned_dir(base_dir, RECIPE) and directory.name.startswith("tiny-albef-ve-")
    state = load_file(str(directory / WEIGHTS_FILE))
    assert {"cls_head.0.weight", "cls_head.2.weight"} <= set(state) and state["cls_head.2.weight"].shape[0] == 3
    assert not any(key.startswith(("itm_head", "vision_proj", "text_proj", "temp")) for key in state)
    losses = json.loads((directory / "recipe.json").read_text())["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model = load_albef(directory, directory / WEIGHTS_FILE, "tiny-albef-ve")
    assert model.heads == {"cls"} and model.entailment_logits(torch.rand(2, 3, 32, 32), ["a star", "a cross"]).shape == (2, 3)
    # the same spec loads through the kind, which does entailment only; a second call reuses the cache
    loaded = load_model(f"tiny-albef-ve@{directory / WEIGHTS_FILE}")
    assert loaded.heads == {"cls"} and loaded.tasks == (Task.ENTAILMENT,)
    assert model_kind("tiny-albef-ve").tasks == (Task.ENTAILMENT,)
    rows = competence(loaded, pairs=3, eps=(2 / 255,))
    assert [(row.attack, row.score.total, row.pairs) for row in rows] == [("clean", 3, "all"), ("pgd", 3, "all")]
    stamp = (directory / WEIGHTS_FILE).stat().st_mtime_ns
    assert ensure_finetuned(base_dir, RECIPE, progress=False) == directory and (directory / WEIGHTS_FILE).stat().st_mtime_ns == stamp


def test_new_base_weights_or_recipe_give_a_new_cache_folder(base_dir):
    before = finetuned_dir(base_dir, RECIPE)
    assert finetuned_dir(base_dir, VeRecipe(train_pairs=12, epochs=4, batch_size=12, lr=3e-3)) != before
    state = load_file(str(base_dir / WEIGHTS_FILE))
    state["temp"] = state["temp"] + 1
    save_file(state, str(base_dir / WEIGHTS_FILE))
    assert finetuned_dir(base_dir, RECIPE) != before


def test_tiny_tcl_ve_is_the_same_recipe_on_the_tcl_base_in_its_own_folder_and_family(base_dir, tmp_path):
    tcl_base = write_text_dir(tmp_path / "tiny-tcl")
    state = load_file(str(base_dir / WEIGHTS_FILE))
    state["temp"] = state["temp"] + 1  # another base model: other bytes
    save_file(state, str(tcl_base / WEIGHTS_FILE))
    directory = ensure_finetuned(tcl_base, RECIPE, progress=False, family="tcl")
    assert directory == finetuned_dir(tcl_base, RECIPE, "tcl") and directory.name.startswith("tiny-tcl-ve-")
    assert directory.name.split("-")[-1] != finetuned_dir(base_dir, RECIPE).name.split("-")[-1]
    loaded = load_model(f"tiny-tcl-ve@{directory / WEIGHTS_FILE}")
    assert loaded.family == "tcl" and loaded.tasks == (Task.ENTAILMENT,) and loaded.heads == {"cls"}
    assert model_kind("tiny-tcl-ve").family == "tcl"
    with pytest.raises(ValueError, match="unknown family 'blip'"):
        finetuned_weights("blip")
