"""Fine-tuning an entailment model: the run's task decides the per-epoch evaluation (accuracy, clean and under PGD).

A random tiny ALBEF with ALBEF's VE head (``albef_fakes``); the defense trains the ViT on image-caption
pairs as for retrieval, F(v) = the raw ViT [CLS] (MAVA's VE script), and each epoch scores entailment pairs.
"""

from __future__ import annotations

import albef_fakes
import pytest
import torch
from albef_fakes import write_tiny_albef

from trainables.config import TrainConfig
from trainables.models import load_model
from trainables.tasks import Task, task_info
from trainables.train import run_training


@pytest.fixture(scope="module")
def ve_spec(tmp_path_factory) -> str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(albef_fakes, "HIDDEN", albef_fakes.VIT_WIDTH)
        text_dir, checkpoint = write_tiny_albef(tmp_path_factory.mktemp("albef-ve-train"), variant="ve")
    return f"albef:{text_dir}@{checkpoint}"


@pytest.mark.parametrize("defense", ["mava", "tecoa"])
def test_an_entailment_run_evaluates_accuracy_each_epoch_and_trains_only_the_vit(ve_spec, tmp_path, defense):
    model = load_model(ve_spec)
    head_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("vision.")}
    vit_before = {n: p.clone() for n, p in model.vision.named_parameters()}
    config = TrainConfig(model=ve_spec, task=Task.ENTAILMENT, defense=defense, train_data="synthetic:train,n=4",
                         eval_data="synthetic-ve:test,n=3", epochs=1, batch_size=4, pgd_steps=1, eval_eps=("2/255",),
                         eval_attacks=("pgd",), N=2, M=3, lr=1e-2)
    reported = []
    metrics = run_training(config, lambda m, checkpoint: reported.append(m), tmp_path, model=model)
    objectives = task_info(Task.ENTAILMENT).objectives(config.eval_attacks, config.eval_eps)
    assert objectives == ["clean/acc", "pgd/eps2/acc"] and set(objectives) <= set(metrics)
    # accuracy over the 3 pairs in percent: a multiple of 100/3
    assert all(metrics[name] == pytest.approx(round(metrics[name] * 3 / 100) * 100 / 3) for name in objectives)
    assert all(torch.equal(p, head_before[n]) for n, p in model.named_parameters() if not n.startswith("vision."))
    assert any(not torch.equal(p, vit_before[n]) for n, p in model.vision.named_parameters())
    assert reported and reported[-1]["clean/acc"] == metrics["clean/acc"]


@pytest.mark.slow
def test_an_entailment_sweep_trial_runs_through_ray_train_and_mlflow(ray_session, ve_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    from platform.sweep import run_sweep
    from platform.sweep_spec import parse_sweep_spec
    from trainables.names import ROLE_TAG, ROLE_TRIAL, TASK_TAG

    data = {
        "experiment": {"name": "ve", "model": ve_spec, "task": "entailment", "train_data": "synthetic:train,n=4",
                       "eval_data": "synthetic-ve:test,n=3", "epochs": 1, "batch_size": 4, "pgd_steps": 1,
                       "eval_attacks": ["pgd"], "eval_eps": ["2/255"], "M": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "search": {"algorithm": "tpe", "num_trials": 1, "seed": 0, "objectives": [{"metric": "pgd/eps2/acc", "mode": "max"}]},
        "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}},
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(parse_sweep_spec(data, "ve.yaml"), tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    assert [row["status"] for row in summary["rows"]] == ["OK"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ve")
    [run] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'")
    assert run.data.tags[TASK_TAG] == Task.ENTAILMENT.value and run.info.status == "FINISHED"
    assert {"clean/acc", "pgd/eps2/acc"} <= set(run.data.metrics)
    assert run.data.metrics["pgd/eps2/acc"] == pytest.approx(round(run.data.metrics["pgd/eps2/acc"] * 3 / 100) * 100 / 3)
