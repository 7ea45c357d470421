"""``model`` as a searched key: one sweep fine-tunes several VLP models, and MLflow and ``platform.compare`` keep them apart.

Two trials through Ray Train (a grid over two random tiny models, a dual encoder and a fusion
model): each trial's workers load the model it drew, pinned at the edge, and its child run
records that model, its family and its weights' sha256; the comparison has one row per model.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from albef_fakes import write_tiny_albef
from platform.compare import comparison_rows
from platform.sweep import run_sweep
from platform.sweep_spec import parse_sweep_spec
from trainables.models.weights import file_sha256
from trainables.names import BASE_WEIGHTS_SHA256, MODEL_FAMILY_TAG, MODEL_TAG, ROLE_TAG, ROLE_TRIAL

pytestmark = pytest.mark.slow


def test_one_sweep_searches_two_models_and_records_each_trials_own(ray_session, random_tiny_clip_weights, tmp_path):
    text_dir, checkpoint = write_tiny_albef(tmp_path / "albef")
    models = {f"tiny-clip@{random_tiny_clip_weights}": ("clip", file_sha256(random_tiny_clip_weights)),
              f"albef:{text_dir}@{checkpoint}": ("albef", file_sha256(checkpoint))}
    data = {
        "experiment": {"name": "models", "model": "tiny-clip", "defense": "fare", "train_data": "synthetic:train,n=4",
                       "eval_data": "synthetic:test,n=4", "epochs": 1, "batch_size": 4, "pgd_steps": 1, "eval_eps": ["2/255"],
                       "eval_attacks": ["pgd"], "lr": 1e-4},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "search": {"algorithm": "grid", "objectives": [{"metric": "pgd/eps2/tr1", "mode": "max"}]},
        "space": {"model": {"distribution": "choice", "values": list(models)}},
    }
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(parse_sweep_spec(data, "models.yaml"), tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    assert [row["status"] for row in summary["rows"]] == ["OK", "OK"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("models")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'")
    recorded = {run.data.tags[MODEL_TAG]: (run.data.tags[MODEL_FAMILY_TAG], run.data.params[BASE_WEIGHTS_SHA256]) for run in runs}
    assert recorded == models  # each trial: the model it drew, its family, the sha256 of the bytes its worker loaded
    # Each model's best encoder is a version of its own registered model, never of another model's.
    run_of = {run.data.tags[MODEL_TAG]: run.info.run_id for run in runs}
    registered = {entry["model"]: (entry["name"], entry["run_id"]) for entry in summary["registered"]}
    assert {model: run_id for model, (_, run_id) in registered.items()} == run_of
    assert len({name for name, _ in registered.values()}) == 2
    for name, run_id in registered.values():
        assert client.get_model_version_by_alias(name, "best").run_id == run_id
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags[MODEL_TAG] == ", ".join(models)
    assert parent.data.params[BASE_WEIGHTS_SHA256] == ", ".join(f"{name}={sha}" for name, (_, sha) in models.items())
    _, rows = comparison_rows(client, "models")
    assert sorted(row["model"] for row in rows) == sorted(models) and all(row["trials"] == 1 for row in rows)
