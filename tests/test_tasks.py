"""Tasks are first-class: model kinds declare their family and tasks; the loop, the sweep and the tools ask the task.

Also the shared command-line pieces: ``platform.evaluate_captions`` uses the argument
types of ``platform.cli`` (no private helpers of ``platform.evaluate``) and probes
``--output`` before any model is loaded, like the other commands.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from trainables.config import Defense, TrainConfig
from trainables.device import resolve_device
from trainables.errors import UserError
from trainables.models import MODEL_KINDS, model_kind
from trainables.names import CLEAN, metric_name
from trainables.tasks import TASKS, Task, task_info, task_of_metrics

REPO = Path(__file__).resolve().parent.parent
# A spec of each kind; nothing is loaded, so the paths need not exist.
SPECS = {"tiny-clip": "tiny-clip", "open_clip": "open_clip:ViT-B-16@/w.pt", "hf-clip": "hf-clip:/d",
         "hf-blip-itr": "hf-blip-itr:/d", "hf-blip-cap": "hf-blip-cap:/d", "albef": "albef:/d@/w.pth", "tcl": "tcl:/d@/w.pth",
         "tiny-albef-ve": "tiny-albef-ve@/w.safetensors", "tiny-tcl-ve": "tiny-tcl-ve@/w.safetensors", "tiny-albef": "tiny-albef",
         "tiny-tcl": "tiny-tcl", "tiny-albef-vg": "tiny-albef-vg@/w.safetensors", "tiny-tcl-vg": "tiny-tcl-vg@/w.safetensors"}


def test_every_model_kind_declares_a_family_and_tasks_that_its_class_agrees_with():
    assert set(SPECS) == set(MODEL_KINDS)
    for name, kind in MODEL_KINDS.items():
        assert kind.family == kind.model_class.family, name
        assert kind.tasks and set(kind.tasks) <= set(Task) and kind.tasks[0] == kind.model_class.tasks[0], name
    # The substring guess ("clip" in the spec) gave hf-blip-itr runs the family "hf-blip-itr".
    assert model_kind(SPECS["hf-blip-itr"]).family == "blip" and model_kind(SPECS["hf-clip"]).family == "clip"
    assert model_kind(SPECS["hf-blip-cap"]).task is Task.CAPTIONING
    with pytest.raises(UserError, match="unknown model kind 'vit-xyz'"):
        model_kind("vit-xyz:/d")


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_the_defenses_a_task_allows_are_the_ones_the_config_accepts(kind):
    """A task's ``defenses`` and the training config's validation say the same thing for every kind."""
    task = task_info(model_kind(SPECS[kind]).task)
    # The options a captioner's objective (Eq. 8) needs; harmless for the other kinds.
    captioner = {} if task.white_box_eval else {"a": 0, "eval_attacks": ()}
    for defense in Defense:
        accepted = True
        try:
            TrainConfig(model=SPECS[kind], defense=defense, **captioner)
        except ValueError:
            accepted = False
        assert accepted == (defense.value in task.defenses), (kind, defense)


def test_each_task_names_its_objectives():
    retrieval, captioning = task_info(Task.RETRIEVAL), task_info(Task.CAPTIONING)
    objectives = retrieval.objectives(("pgd",), (2 / 255,))
    assert metric_name(CLEAN, None, "tr1") in objectives and "pgd/eps2/ir5" in objectives
    # A captioner's per-epoch evaluation is clean only; METEOR and SPICE may be missing offline.
    assert captioning.objectives(("pgd",), (2 / 255,)) == [f"{CLEAN}/{k}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")]
    assert captioning.owns_metric("pgd/eps2/cider") and not captioning.owns_metric("clean/tr1")
    assert task_of_metrics({"clean/tr1", "clean/cider"}) is Task.CAPTIONING and task_of_metrics({"clean/tr1"}) is Task.RETRIEVAL


def test_the_training_loop_evaluates_with_its_models_task(random_tiny_clip, synthetic_test_set, monkeypatch):
    """``evaluate_model`` calls the evaluator the model's task names, with the config's attacks, eps and seed."""
    from trainables.train import evaluate_model

    seen = []

    def fake(model, dataset, settings, progress):
        seen.append((model, settings))
        return {"clean/tr1": 12.5}

    monkeypatch.setitem(TASKS, Task.RETRIEVAL, dataclasses.replace(TASKS[Task.RETRIEVAL], evaluate=fake))
    config = TrainConfig(model="tiny-clip", eval_attacks=("pgd",), eval_eps=(4 / 255,), seed=3, batch_size=8)
    assert evaluate_model(random_tiny_clip, synthetic_test_set, config) == {"clean/tr1": 12.5}
    (model, settings), = seen
    assert model is random_tiny_clip and settings.attacks == ("pgd",) and settings.eps == (4 / 255,) and settings.seed == 3


def test_a_run_may_choose_only_a_task_its_model_kind_does(capsys):
    """``task`` (config) and ``--task`` (platform.evaluate) default to the kind's main task and refuse any other it lacks."""
    from platform.evaluate import main as evaluate_main
    from platform.tracking import run_task

    assert TrainConfig().run_task is Task.RETRIEVAL and TrainConfig(task="retrieval").run_task is Task.RETRIEVAL
    with pytest.raises(ValueError, match="task 'captioning' is not one that model 'tiny-clip' does: its kind does retrieval"):
        TrainConfig(task="captioning")
    assert run_task({"model": "tiny-clip", "task": None}) is Task.RETRIEVAL
    assert run_task({"model": "hf-blip-cap:/d"}) is Task.CAPTIONING
    with pytest.raises(UserError, match="--task captioning: model 'tiny-clip' does retrieval"):
        evaluate_main(["--model", "tiny-clip", "--task", "captioning", "--data", "synthetic:test,n=4"])


def test_a_comparison_group_takes_its_task_from_the_tag():
    from platform.compare import group_task, rank_metric

    assert group_task([{"mava.task": "captioning"}], {"clean/tr1"}) is Task.CAPTIONING
    assert group_task([{}], {"clean/cider"}) is Task.CAPTIONING  # runs from before the tag: their metrics say it
    assert rank_metric({"clean/cider"}, None, "pgd/eps2/tr1", Task.CAPTIONING) == "clean/cider"
    assert rank_metric({"clean/tr1"}, None, "pgd/eps2/tr1", Task.RETRIEVAL) == "pgd/eps2/tr1"


def test_one_device_resolver_refuses_what_cannot_run():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available"):
            resolve_device("cuda")


def test_evaluate_captions_uses_the_shared_argument_types_not_private_helpers():
    tree = ast.parse((REPO / "platform" / "evaluate_captions.py").read_text())
    imported = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names]
    assert not [name for module, name in imported if module and module.startswith("platform") and name.startswith("_")]


def test_evaluate_captions_probes_output_before_loading_anything(tmp_path):
    """An unwritable ``--output`` is refused first; the model directory (not a BLIP model at all) is never read."""
    from platform.evaluate_captions import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write to .*a-file.*choose a writable folder for --output"):
        main(["--model", f"hf-blip-cap:{tmp_path}", "--data", "synthetic:test,n=2", "--output", str(blocker / "out.json")])
    with pytest.raises(UserError, match="is a folder: give a file name"):
        main(["--model", f"hf-blip-cap:{tmp_path}", "--data", "synthetic:test,n=2", "--output", str(tmp_path)])


@pytest.mark.parametrize("command", ["platform.evaluate", "platform.evaluate_captions"])
def test_a_device_that_cannot_exist_is_refused_by_argparse(command, capsys):
    module = __import__(command, fromlist=["main"])
    with pytest.raises(SystemExit) as stopped:
        module.main(["--model", "tiny-clip", "--data", "synthetic:test,n=2", "--device", "gpu"])
    assert stopped.value.code == 2 and "unknown device 'gpu'" in capsys.readouterr().err
