"""A grounding sweep end to end: one Ray Train trial of a random tiny ALBEF, its grounding objective in MLflow."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from albef_fakes import write_tiny_albef
from platform.sweep import run_sweep
from platform.sweep_spec import parse_sweep_spec
from platform.tracking import ROLE_TAG
from trainables.names import TASK_TAG

pytestmark = pytest.mark.slow


def test_a_grounding_trial_records_its_accuracy_objective(ray_session, tmp_path):
    text_dir, checkpoint = write_tiny_albef(tmp_path / "albef")
    data = {
        "experiment": {"name": "grounding", "model": f"albef:{text_dir}@{checkpoint}", "task": "grounding", "defense": "fare",
                       "train_data": "synthetic:train,n=4", "eval_data": "synthetic-vg:test,n=3", "epochs": 1, "batch_size": 4,
                       "pgd_steps": 1, "eval_eps": ["2/255"], "eval_attacks": ["pgd"]},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "search": {"algorithm": "tpe", "num_trials": 1, "seed": 0, "objectives": [{"metric": "pgd/eps2/acc", "mode": "max"}]},
        "space": {"lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-3}},
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(parse_sweep_spec(data, "grounding.yaml"), tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    assert [row["status"] for row in summary["rows"]] == ["OK"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("grounding")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    assert run.data.tags[TASK_TAG] == "grounding" and run.info.status == "FINISHED"
    assert {"clean/acc", "clean/acc_testA", "pgd/eps2/acc"} <= set(run.data.metrics)
    assert 0.0 <= run.data.metrics["pgd/eps2/acc"] <= 100.0
