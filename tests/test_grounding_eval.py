"""Grounding as a task: rows against a hand case, baselines, the attacks' invariants, the task entry and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from albef_fakes import write_tiny_albef
from trainables.data import load_dataset
from trainables.data.grounding import GroundingItem
from trainables.errors import UserError
from trainables.evaluation.grounding_eval import (GroundingSettings, accuracy_keys, attach_grounding_warnings,
                                                  co_attack_grounding, evaluate_grounding_rows, grounding_baselines,
                                                  grounding_metrics, match_scores, pgd_itm_attack)
from trainables.models import MODEL_KINDS, load_model
from trainables.tasks import Task, task_info, task_of_metrics

GRID, SIDE = 4, 32  # the hand model's patch grid and image side


class BrightnessGrounder(nn.Module):
    """A hand-made grounding model: the "cross-attention" over the 4x4 patches is the softmax of each patch's
    brightness and the match score its sum over patches, so GradCAM (A * dS/dA, dS/dA = 1) is the attention:
    the map peaks on the brightest patch."""

    spec = "hand:brightness"

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.zeros(3))
        self.scale = nn.Parameter(torch.tensor(20.0))

    def itm_cross_attention(self, pixels, texts, layer=None):
        with torch.enable_grad():
            patches = nn.functional.avg_pool2d(pixels.mean(dim=1, keepdim=True), SIDE // GRID).flatten(1)  # (B, 16)
            tokens = torch.cat([torch.zeros(len(pixels), 1), patches], dim=1).detach().requires_grad_(True)
            attention = torch.softmax(self.scale.detach() * tokens, dim=-1).view(len(pixels), 1, 1, -1)
            score = attention[:, 0, 0, 1:].sum(dim=-1)
        return score, attention, torch.ones(len(pixels), 1)


def _item(bright_cell: tuple[int, int], box, proposals, split: str, index: int) -> GroundingItem:
    image = torch.zeros(3, SIDE, SIDE)
    row, col = bright_cell
    cell = SIDE // GRID
    image[:, row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = 1.0
    return GroundingItem(image, "the thing", tuple(box), tuple(tuple(p) for p in proposals), split, str(index), str(index), (64, 64))


# On the 64 x 64 original, cell (r, c) of the 4x4 grid covers [16c, 16c + 16) x [16r, 16r + 16).
HAND_ITEMS = [
    _item((1, 1), (16, 16, 16, 16), [(48, 48, 16, 16), (16, 16, 16, 16)], "val", 0),  # hit
    _item((0, 3), (48, 0, 16, 16), [(48, 0, 16, 16), (0, 0, 16, 16), (0, 48, 16, 16)], "testA", 1),  # hit
    _item((3, 0), (48, 48, 16, 16), [(0, 48, 16, 16), (48, 48, 16, 16)], "testA", 2),  # miss: the map picks (0, 48)
    _item((2, 2), (32, 32, 16, 16), [(32, 32, 16, 16), (0, 0, 8, 8)], "testB", 3),  # hit
]


def test_grounding_rows_match_a_hand_case():
    rows = evaluate_grounding_rows(BrightnessGrounder(), HAND_ITEMS, GroundingSettings(attacks=(), batch_size=3))
    assert len(rows) == 1 and rows[0].attack == "clean" and rows[0].threat == "none" and rows[0].items == 4
    assert rows[0].accuracy == {"acc": 75.0, "acc_val": 100.0, "acc_testA": 50.0, "acc_testB": 100.0}
    assert rows[0].counts == {"acc": (3, 4), "acc_val": (1, 1), "acc_testA": (1, 2), "acc_testB": (1, 1)}
    assert grounding_metrics(rows) == {"clean/acc": 75.0, "clean/acc_val": 100.0, "clean/acc_testA": 50.0, "clean/acc_testB": 100.0}


def test_accuracy_keys_skip_unknown_splits_and_baselines_match_a_hand_case():
    accuracy, counts = accuracy_keys([True, False, True], ["train", "train", "val"])
    assert accuracy == {"acc": pytest.approx(200 / 3), "acc_val": 100.0} and counts["acc"] == (2, 3)
    baselines = grounding_baselines(HAND_ITEMS)
    # one hitting proposal each: chance = mean(1/2, 1/3, 1/2, 1/2); largest box: item 3's 16x16 ground truth only
    # (items 0-2 tie on area; the first is picked: a miss, a hit, a miss).
    assert baselines.chance == pytest.approx(100 * (1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    assert baselines.largest_box == 50.0 and baselines.mean_proposals == 2.25 and baselines.items == 4


def test_row_warnings_flag_an_attack_above_clean_and_a_larger_eps_above_a_smaller():
    rows = evaluate_grounding_rows(BrightnessGrounder(), HAND_ITEMS, GroundingSettings(attacks=(), batch_size=4))
    clean = rows[0]
    fake = [clean, type(clean)("pgd", 2 / 255, {"acc": 25.0}, {}, "white-box", None, 100),
            type(clean)("pgd", 4 / 255, {"acc": 100.0}, {}, "white-box", None, 100)]
    warned = attach_grounding_warnings(fake)
    assert warned[0].warnings == () and warned[1].warnings == ()
    assert any("above clean" in w for w in warned[2].warnings) and any("smaller eps" in w for w in warned[2].warnings)


def test_unknown_attacks_and_models_without_grounding_are_refused():
    with pytest.raises(UserError, match="sga.*cannot be evaluated on grounding"):
        GroundingSettings(attacks=("sga",))
    with pytest.raises(UserError, match="cannot ground expressions"):
        evaluate_grounding_rows(nn.Linear(1, 1), HAND_ITEMS, GroundingSettings(attacks=()))


# ---- on a random tiny ALBEF: attack invariants, the evaluator's contract ---------------------


@pytest.fixture(scope="module")
def albef_spec(tmp_path_factory) -> str:
    text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("grounding-albef"))
    return f"albef:{text_dir}@{checkpoint}"


@pytest.fixture(scope="module")
def albef(albef_spec):
    return load_model(albef_spec)


@pytest.fixture(scope="module")
def vg_items():
    return load_dataset("synthetic-vg:test,n=6", 32)


def _batch(items, count=3):
    return torch.stack([items[i].image for i in range(count)]), [items[i].expression for i in range(count)]


ATTACKS = {"pgd": pgd_itm_attack, "co-attack": co_attack_grounding}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_grounding_attacks_stay_in_the_ball_are_deterministic_and_leave_the_model_untouched(name, albef_spec, vg_items):
    model = load_model(albef_spec)  # private copy: the test flags it
    images, expressions = _batch(vg_items)
    model.train()
    model.vision.requires_grad_(True)  # as during fine-tuning
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    eps = 4 / 255
    runs = [ATTACKS[name](model, images, expressions, eps, torch.Generator().manual_seed(seed), steps=2) for seed in (5, 5, 6)]
    for out in runs:
        assert out.images.shape == images.shape and (out.images - images).abs().max() <= eps + 1e-7
        assert out.images.min() >= 0 and out.images.max() <= 1
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].captions == runs[1].captions
    assert not torch.equal(runs[0].images, runs[2].images)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert modes == {n: m.training for n, m in model.named_modules()}
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    if name == "co-attack":
        assert [len(group) for group in runs[0].captions] == [1, 1, 1] and "features" in runs[0].text_source


def test_pgd_lowers_the_itm_logit_of_the_true_expression(albef, vg_items):
    images, expressions = _batch(vg_items)
    out = pgd_itm_attack(albef, images, expressions, 8 / 255, torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, adversarial = match_scores(albef, images, expressions), match_scores(albef, out.images, expressions)
    assert (adversarial < clean).all(), (clean, adversarial)


def test_evaluator_rows_white_box_and_transfer_leave_the_models_untouched(albef_spec, albef, vg_items):
    model = load_model(albef_spec)
    model.train()
    model.vision.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = GroundingSettings(attacks=("pgd",), eps=(2 / 255,), batch_size=4)
    rows = evaluate_grounding_rows(model, vg_items, settings)
    assert [(r.attack, r.threat) for r in rows] == [("clean", "none"), ("pgd", "white-box")]
    assert set(rows[0].accuracy) == {"acc", "acc_val", "acc_testA", "acc_testB"} and rows[0].items == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert all(p.grad is None for p in model.parameters())
    assert rows == evaluate_grounding_rows(model, vg_items, settings)  # deterministic given the seed
    transfer = evaluate_grounding_rows(model, vg_items, settings, surrogate=albef)
    assert transfer[1].threat == f"transfer:{albef.spec}" and transfer[0] == rows[0]


def test_grounding_is_a_task_of_the_fusion_kinds_with_valid_objectives():
    assert Task.GROUNDING in MODEL_KINDS["albef"].tasks and Task.GROUNDING in MODEL_KINDS["tcl"].tasks
    assert Task.GROUNDING not in MODEL_KINDS["tiny-clip"].tasks
    info = task_info(Task.GROUNDING)
    assert "clean/acc_testA" in info.objectives(("pgd",), (2 / 255,)) and "pgd/eps2/acc" in info.objectives(("pgd",), (2 / 255,))
    assert task_of_metrics({"clean/acc_val", "pgd/eps2/acc"}) is Task.GROUNDING
    assert task_of_metrics({"clean/tr1"}) is Task.RETRIEVAL


def test_platform_evaluate_task_grounding_writes_rows_and_refuses_bad_input(albef_spec, tmp_path, capsys):
    from platform.evaluate import main

    output = tmp_path / "rows.json"
    code = main(["--task", "grounding", "--model", albef_spec, "--data", "synthetic-vg:test,n=3", "--attacks", "pgd",
                 "--eps", "2/255", "--output", str(output), "--no-progress", "--word-candidates", "offline"])
    assert code == 0
    rows = json.loads(output.read_text())
    assert [(r["attack"], r["eps"]) for r in rows] == [("clean", None), ("pgd", "2/255")]
    assert rows[0]["task"] == "grounding" and rows[0]["hits"]["acc"][1] == 3 and "chance" in rows[0]["baselines"]
    printed = capsys.readouterr().out
    assert "testA" in printed and "baselines: chance" in printed
    with pytest.raises(UserError, match="grounding is evaluated under pgd, co-attack"):
        main(["--task", "grounding", "--model", albef_spec, "--data", "synthetic-vg:test,n=3", "--attacks", "sga"])
    with pytest.raises(UserError, match="needs referring expressions with boxes"):
        main(["--task", "grounding", "--model", albef_spec, "--data", "synthetic:test,n=3"])
    with pytest.raises(UserError, match="--task grounding"):
        main(["--task", "grounding", "--model", "tiny-clip", "--data", "synthetic-vg:test,n=3"])


def test_the_gradcam_layer_is_chosen_recorded_and_checked(albef_spec, tmp_path):
    """--gradcam-layer names the fusion layer GradCAM reads (ALBEF's --block_num) and the rows record it; a text-only
    layer, a layer past the last, or the option on another task is refused."""
    from platform.evaluate import main
    from trainables.models import load_model

    model = load_model(albef_spec)
    config = model.text_encoder.config  # the fake has text layers 0..fusion_layer-1, then fusion layers
    recorded = {}
    for layer in (None, config.num_hidden_layers - 1):
        output = tmp_path / f"rows-{layer}.json"
        main(["--task", "grounding", "--model", albef_spec, "--data", "synthetic-vg:test,n=3", "--attacks", "pgd", "--eps", "2/255",
              "--output", str(output), "--no-progress", "--no-checks", *(["--gradcam-layer", str(layer)] if layer is not None else [])])
        recorded[layer] = {row["gradcam_layer"] for row in json.loads(output.read_text())}
    assert recorded == {None: {model.gradcam_layer}, config.num_hidden_layers - 1: {config.num_hidden_layers - 1}}
    for layer in (config.fusion_layer - 1, config.num_hidden_layers):
        with pytest.raises(UserError, match=f"GradCAM layer {layer} is not a fusion layer .*choose one of {config.fusion_layer}"):
            main(["--task", "grounding", "--model", albef_spec, "--data", "synthetic-vg:test,n=3", "--no-progress", "--no-checks",
                  "--gradcam-layer", str(layer)])
    with pytest.raises(UserError, match="--gradcam-layer is for --task grounding"):
        main(["--model", albef_spec, "--data", "synthetic:test,n=3", "--gradcam-layer", "1"])


def test_run_training_evaluates_grounding_after_the_epoch(albef_spec, tmp_path):
    from trainables.config import TrainConfig
    from trainables.train import run_training

    config = TrainConfig(model=albef_spec, task="grounding", defense="fare", train_data="synthetic:train,n=4",
                         eval_data="synthetic-vg:test,n=3", epochs=1, batch_size=4, pgd_steps=1, eval_eps=("2/255",),
                         eval_attacks=("pgd",), lr=1e-3)
    reported = []
    metrics = run_training(config, lambda m, checkpoint: reported.append(m), tmp_path, model=load_model(albef_spec))
    expected = {"clean/acc", "clean/acc_val", "clean/acc_testA", "clean/acc_testB", "pgd/eps2/acc", "pgd/eps2/acc_testB"}
    assert expected <= set(metrics) and all(0.0 <= metrics[k] <= 100.0 for k in expected)
    assert not any(key.endswith("tr1") for key in metrics)  # the retrieval evaluator did not run
    with pytest.raises(UserError, match="grounding needs referring expressions"):
        evaluate_grounding_rows(load_model(albef_spec), load_dataset("synthetic:test,n=2", 32), GroundingSettings(attacks=()))


# ---- the embedded grounding fine-tuning (ALBEF's Grounding.py:train: ITC + ITM on the expressions) ----------


def test_grounding_finetuning_is_cached_by_content_and_loads_strictly(albef_spec, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import save_file

    from trainables.models.albef import load_albef
    from trainables.models.tiny_albef_vg import WEIGHTS, TinyAlbefVgVLP, TinyTclVgVLP, VgRecipe, albef_state, ensure_tiny_albef_vg

    monkeypatch.setenv("MAVA_CACHE_DIR", str(tmp_path / "cache"))
    base = load_model(albef_spec)
    base_dir = tmp_path / "base"
    shutil.copytree(albef_spec.split(":", 1)[1].split("@")[0], base_dir)
    save_file(albef_state(base), str(base_dir / WEIGHTS))
    recipe = VgRecipe(train_refs=8, epochs=1, batch_size=4)
    folder = ensure_tiny_albef_vg(base_dir, recipe, progress=False)
    assert folder.name == f"tiny-albef-vg-{recipe.cache_key(base_dir / WEIGHTS)}" and folder.parent == tmp_path / "cache"
    tuned = load_albef(folder, folder / WEIGHTS, "albef:tuned")  # strict load: ALBEF's retrieval layout
    before, after = base.state_dict(), tuned.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("text_encoder."))  # every weight trains
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vision."))
    recorded = json.loads((folder / "recipe.json").read_text())
    assert recorded["train_refs"] == 8 and recorded["binding_weight"] == 1.0
    stamp = (folder / WEIGHTS).stat().st_mtime_ns
    assert ensure_tiny_albef_vg(base_dir, recipe, progress=False) == folder and (folder / WEIGHTS).stat().st_mtime_ns == stamp
    # the model kinds load it; grounding is their main task, and their ITC/ITM heads still retrieve
    for kind, model_class in (("tiny-albef-vg", TinyAlbefVgVLP), ("tiny-tcl-vg", TinyTclVgVLP)):
        loaded = load_model(f"{kind}@{folder / WEIGHTS}")
        assert type(loaded) is model_class and loaded.tasks == (Task.GROUNDING, Task.RETRIEVAL) and loaded.heads == {"itm"}
    assert VgRecipe(binding_weight=0.0).cache_key(base_dir / WEIGHTS) != VgRecipe().cache_key(base_dir / WEIGHTS)
    assert ensure_tiny_albef_vg(base_dir, recipe, progress=False, family="tcl").name.startswith("tiny-tcl-vg-")
    with pytest.raises(UserError, match="not a tiny-albef folder"):
        ensure_tiny_albef_vg(tmp_path, recipe, progress=False)


def test_the_binding_negatives_teach_the_itm_head_to_prefer_the_true_expression(albef_spec):
    """30 steps on binding_itm_loss alone, on one batch: the loss falls and the true expressions win far more often."""
    from trainables.data.synthetic_vg import SyntheticGrounding
    from trainables.evaluation.binding import binding_cases, binding_rates
    from trainables.models.tiny_albef_vg import binding_itm_loss

    model = load_model(albef_spec)
    scenes = SyntheticGrounding("train", 24)
    cases = binding_cases(scenes.scenes)
    pixels = scenes.images[[case.index for case in cases]].float() / 255
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = binding_rates(model.eval(), scenes.images.float() / 255, cases)["rebound"]
    losses = []
    for _ in range(30):
        loss = binding_itm_loss(model.train(), model.image_tokens(pixels), cases)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = binding_rates(model.eval(), scenes.images.float() / 255, cases)["rebound"]
    assert losses[-1] < losses[0] and after >= before + 20  # 47.4 -> 78.9 on this random model


def test_the_comparison_table_has_grounding_columns():
    from platform.compare import grounding_columns, recall_columns

    recorded = {"clean/acc", "clean/acc_testB", "pgd/eps4/acc", "pgd/eps2/acc", "pgd/eps2/acc_testB", "train/loss"}
    assert grounding_columns(recorded) == ["clean/acc", "clean/acc_testB", "pgd/eps2/acc", "pgd/eps2/acc_testB", "pgd/eps4/acc"]
    assert recall_columns(recorded) == []
