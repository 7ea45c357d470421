"""Visual entailment as a task: accuracy rows against hand-computed cases, the VE attacks' contract, the task entry.

Models are either a hand-written text-only rule (its accuracy on synthetic-ve is known exactly)
or a random tiny ALBEF with ALBEF's VE head written by ``albef_fakes`` (official key layout).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import albef_fakes
from albef_fakes import write_tiny_albef
from torch import nn

from trainables.data import load_dataset
from trainables.data.entailment import CONTRADICTION, ENTAILMENT, NEUTRAL, EntailmentItem
from trainables.errors import UserError
from trainables.evaluation.entailment_eval import (EntailmentRow, EntailmentSettings, attach_entailment_warnings,
                                                   entailment_honesty_checks, evaluate_entailment_rows,
                                                   metrics_from_entailment_rows, pgd_entailment_attack)
from trainables.evaluation.entailment import entailment_accuracy
from trainables.models import load_model
from trainables.seeds import EVAL_ATTACK, derive_seed
from trainables.tasks import Task, task_info, task_of_metrics

EPS = (2 / 255, 4 / 255)


class HiddenClauseRule(nn.Module):
    """Text only: 'made of' / 'drawn by' / 'painted' -> neutral, otherwise entailment (never contradiction)."""

    spec = "hidden-clause-rule"

    def __init__(self):
        super().__init__()
        self.register_buffer("pixel_mean", torch.zeros(3))

    def entailment_logits(self, pixels: torch.Tensor, hypotheses: list[str]) -> torch.Tensor:
        hidden = torch.tensor([any(w in h for w in ("made of", "drawn by", "painted")) for h in hypotheses])
        return F.one_hot(torch.where(hidden, NEUTRAL, ENTAILMENT), 3).float() + 0 * pixels.sum()


def _ve_spec(directory, seed: int = 0) -> str:
    # Text width = ViT width (as ALBEF's 768/768): Co-attack and SGA compare the two [CLS] features directly.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(albef_fakes, "HIDDEN", albef_fakes.VIT_WIDTH)
        text_dir, checkpoint = write_tiny_albef(directory, variant="ve", seed=seed)
    return f"albef:{text_dir}@{checkpoint}"


@pytest.fixture(scope="module")
def ve_spec(tmp_path_factory) -> str:
    return _ve_spec(tmp_path_factory.mktemp("albef-ve"))


@pytest.fixture(scope="module")
def ve_pairs():
    return load_dataset("synthetic-ve:test,n=3", 32)


def test_text_only_rule_scores_exactly_two_thirds_with_hand_counted_classes():
    # synthetic-ve's design: every neutral hypothesis has a hidden clause, no entailment one does,
    # so the rule gets all entailment and neutral pairs right and every contradiction wrong.
    dataset = load_dataset("synthetic-ve:test,n=30", 32)
    [row] = evaluate_entailment_rows(HiddenClauseRule(), dataset, EntailmentSettings(attacks=(), batch_size=7))
    assert (row.score.correct, row.score.total) == (20, 30)
    assert row.accuracy == pytest.approx(200 / 3)
    assert row.score.per_class["contradiction"].correct == 0 and row.score.per_class["contradiction"].total == 10
    assert row.score.per_class["neutral"].correct == 10 and row.score.per_class["entailment"].correct == 10
    assert row.threat == "none" and row.pairs == "all"
    [only] = evaluate_entailment_rows(HiddenClauseRule(), dataset, EntailmentSettings(attacks=(), pairs="entailment"))
    assert (only.score.correct, only.score.total, only.pairs) == (10, 10, "entailment")
    assert only.to_json()["per_class"]["neutral"]["total"] == 0


def test_accuracy_metric_on_a_hand_case():
    score = entailment_accuracy(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]),
                                [ENTAILMENT, NEUTRAL, NEUTRAL, CONTRADICTION])
    assert (score.correct, score.total) == (2, 4)
    assert score.per_class["neutral"].predicted == 2 and score.per_class["contradiction"].correct == 0


def test_pgd_on_the_classifier_keeps_the_contract_and_raises_the_loss(ve_spec, ve_pairs):
    model = load_model(ve_spec)
    model.train()  # the attack must evaluate in eval mode and give the mode back
    items = [ve_pairs[i] for i in range(3)]
    images = torch.stack([item.image for item in items])
    hypotheses, labels = [item.hypothesis for item in items], torch.tensor([item.label for item in items])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    runs = [pgd_entailment_attack(model, images, hypotheses, labels, 4 / 255, torch.Generator().manual_seed(3)).images
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - images).abs().max() <= 4 / 255 + 1e-6 and runs[0].min() >= 0 and runs[0].max() <= 1
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[name], p) and p.grad is None for name, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model.entailment_logits(images, hypotheses), labels)
        attacked = F.cross_entropy(model.entailment_logits(runs[0], hypotheses), labels)
    assert attacked > clean


def test_every_ve_attack_gives_a_row_with_its_settings(ve_spec, ve_pairs):
    model = load_model(ve_spec)
    settings = EntailmentSettings(attacks=("pgd", "co-attack", "sga"), eps=(4 / 255,), batch_size=2)
    rows = evaluate_entailment_rows(model, ve_pairs, settings)
    assert [(r.attack, r.eps) for r in rows] == [("clean", None)] + [(a, 4 / 255) for a in settings.attacks]
    assert all(r.score.total == 3 and r.pairs == "all" for r in rows)
    assert [r.threat for r in rows] == ["none"] + ["white-box"] * 3
    assert rows[1].text_source is None and rows[2].text_source == "offline:char" and rows[3].text_source == "offline:char"
    metrics = metrics_from_entailment_rows(rows)
    assert set(metrics) == {"clean/acc", "pgd/eps4/acc", "co-attack/eps4/acc", "sga/eps4/acc"}
    assert metrics["clean/acc"] == pytest.approx(100 * rows[0].score.correct / 3)
    assert rows[0].to_json()["acc"] == metrics["clean/acc"] and rows[1].to_json()["eps"] == "4/255"


def test_transfer_rows_are_labelled_and_never_differentiate_the_target(ve_spec, ve_pairs, tmp_path):
    surrogate, target = load_model(_ve_spec(tmp_path, seed=1)), load_model(ve_spec)
    target.vision.requires_grad_(True)
    graded, scored = [], []

    def record(module, inputs, output):
        graded.append(output.requires_grad)
        scored.append(inputs[0].detach().clone())

    hook = target.vision.patch_embed.proj.register_forward_hook(record)  # the ViT's first layer sees the scored pixels
    try:
        rows = evaluate_entailment_rows(target, ve_pairs, EntailmentSettings(attacks=("pgd",), eps=(2 / 255,)), surrogate=surrogate)
    finally:
        hook.remove()
    assert graded and not any(graded) and all(p.grad is None for p in target.parameters())
    assert rows[1].threat == f"transfer:{surrogate.spec}"
    # What the target scored under pgd is the surrogate's PGD image (batch 0, run 1), not the target's own.
    items = [ve_pairs[i] for i in range(len(ve_pairs))]
    images, hypotheses = torch.stack([i.image for i in items]), [i.hypothesis for i in items]
    labels = torch.tensor([i.label for i in items])
    seed = derive_seed(0, EVAL_ATTACK, 0, 1)
    on_surrogate = pgd_entailment_attack(surrogate, images, hypotheses, labels, 2 / 255, torch.Generator().manual_seed(seed)).images
    on_target = pgd_entailment_attack(target, images, hypotheses, labels, 2 / 255, torch.Generator().manual_seed(seed)).images
    assert torch.allclose(scored[1], target.normalize(on_surrogate), atol=1e-6)
    assert not torch.allclose(scored[1], target.normalize(on_target), atol=1e-6)


class NoCaptions(torch.utils.data.Dataset):
    """SNLI-VE-like pairs: no premise captions."""

    def __init__(self, base):
        self.base, self.labels = base, base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index) -> EntailmentItem:
        return self.base[index]


def test_attacks_that_do_not_apply_are_refused_by_name(ve_spec, ve_pairs, tmp_path):
    model = load_model(ve_spec)
    with pytest.raises(UserError, match="sga does not apply.*no premise captions"):
        evaluate_entailment_rows(model, NoCaptions(ve_pairs), EntailmentSettings(attacks=("sga",)))
    with pytest.raises(UserError, match="apgd do not apply to visual entailment"):
        evaluate_entailment_rows(model, ve_pairs, EntailmentSettings(attacks=("apgd",)))
    text_dir, checkpoint = write_tiny_albef(tmp_path, variant="ve")  # the fakes' default: text 24 wide, ViT 32
    with pytest.raises(UserError, match="32-wide image and 24-wide text features: these attacks do not apply"):
        evaluate_entailment_rows(load_model(f"albef:{text_dir}@{checkpoint}"), ve_pairs, EntailmentSettings(attacks=("co-attack",)))
    with pytest.raises(UserError, match="scores .premise image, hypothesis, label. pairs, and this data has none"):
        evaluate_entailment_rows(model, load_dataset("synthetic:test,n=2", 32), EntailmentSettings(attacks=()))
    with pytest.raises(UserError, match="pairs='some'"):
        evaluate_entailment_rows(model, ve_pairs, EntailmentSettings(attacks=(), pairs="some"))


def test_honesty_checks_quiet_on_the_fake_and_row_warnings_catch_contradictions(ve_spec, ve_pairs):
    assert entailment_honesty_checks(load_model(ve_spec), ve_pairs, EntailmentSettings(eps=(4 / 255,)), num_pairs=2) == []
    score = lambda correct: entailment_accuracy([ENTAILMENT] * correct + [NEUTRAL] * (10 - correct), [ENTAILMENT] * 10)
    rows = attach_entailment_warnings([EntailmentRow("clean", None, score(5), "none", "all"),
                                       EntailmentRow("pgd", 2 / 255, score(2), "white-box", "all"),
                                       EntailmentRow("pgd", 4 / 255, score(9), "white-box", "all")])
    assert rows[1].warnings == ()
    assert any("above clean" in w for w in rows[2].warnings) and any("smaller eps" in w for w in rows[2].warnings)


def test_entailment_is_a_task_with_accuracy_objectives():
    info = task_info(Task.ENTAILMENT)
    assert info.objectives(("pgd", "co-attack"), EPS) == ["clean/acc", "pgd/eps2/acc", "pgd/eps4/acc",
                                                          "co-attack/eps2/acc", "co-attack/eps4/acc"]
    assert task_of_metrics({"clean/acc", "pgd/eps2/acc"}) is Task.ENTAILMENT
    assert task_of_metrics({"clean/tr1"}) is Task.RETRIEVAL


def test_the_comparison_table_has_accuracy_columns_for_entailment_runs():
    from platform.compare import entailment_columns, recall_columns

    names = {"sga/eps2/acc", "pgd/eps4/acc", "clean/acc", "pgd/eps2/acc", "train/loss"}
    assert entailment_columns(names) == ["clean/acc", "pgd/eps2/acc", "pgd/eps4/acc", "sga/eps2/acc"]
    assert recall_columns(names) == []
