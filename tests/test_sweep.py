"""Sweeps end to end on one shared Ray instance: Optuna, Ray Train trials, MLflow contents, resume, job submit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import REPO_ROOT
from platform import compare
from platform.results import pareto_front
from platform.sweep import run_sweep
from platform.sweep_spec import parse_sweep_spec
from platform.tracking import ROLE_TAG, SWEEP_TAG, sha256_of
from trainables.evaluation.uncertainty import TR, read_ranks, recall_of
from trainables.names import RANKS_FILE

pytestmark = pytest.mark.slow


def tiny_sweep(weights, name: str, **search) -> dict:
    return {
        "experiment": {"name": name, "model": f"tiny-clip@{weights}", "train_data": "synthetic:train,n=12",
                       "eval_data": "synthetic:test,n=6", "epochs": 2, "batch_size": 6, "pgd_steps": 1, "eval_eps": ["4/255"],
                       "M": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "search": {"algorithm": "tpe", "num_trials": 2, "seed": 0, "objectives": [{"metric": "pgd/eps4/tr1", "mode": "max"}], **search},
        "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}, "N": {"distribution": "int", "low": 1, "high": 2}},
    }


def trial_runs(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")


def test_multi_objective_sweep_records_everything_in_mlflow(ray_session, random_tiny_clip_weights, tmp_path, capsys, monkeypatch):
    # One configuration run once per seed (search.seeds): Optuna is told its mean, MLflow records each seed's trial.
    data = tiny_sweep(random_tiny_clip_weights, "multi", algorithm="nsga2", num_trials=1, seeds=[0, 1],
                      objectives=[{"metric": "pgd/eps4/tr1", "mode": "max"}, {"metric": "clean/tr1", "mode": "max"}])
    spec = parse_sweep_spec(data, "multi.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"))

    assert len(summary["rows"]) == 2 and all(r["status"] == "OK" for r in summary["rows"])
    assert summary["pareto_front"] and summary["pareto_front"] == pareto_front(summary["pareto_front"], spec)
    client = MlflowClient(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags[ROLE_TAG] == "sweep" and parent.info.status == "FINISHED"
    children = trial_runs(client, "multi")
    assert len(children) == 2
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        assert run.data.tags[SWEEP_TAG] == summary["sweep_id"] and run.info.status == "FINISHED"
        assert {"a", "N", "M", "lr", "eps", "defense", "model"} <= set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "pgd/eps4/tr1")
        assert sorted(m.step for m in history) == [1, 2]  # one point per epoch, no duplicates
        assert {"clean/tr1", "clean/ir1", "train/l_cms", "train/l_vsse", "train/l_sca"} <= set(run.data.metrics)
        local = client.download_artifacts(run.info.run_id, "checkpoint", str(tmp_path / run.info.run_id))
        card = json.loads(open(os.path.join(local, "card.json")).read())
        assert card["sha256"] == sha256_of(os.path.join(local, "vision.safetensors"))
        assert card["defense"] == "mava" and card["base_model"].startswith("tiny-clip@")
        assert load_file(os.path.join(local, "vision.safetensors"))
        ranks = read_ranks(os.path.join(local, RANKS_FILE))  # the final evaluation's ranks, what compare bootstraps
        assert recall_of(ranks[("clean", None)], TR) == pytest.approx(run.data.metrics["clean/tr1"])
    assert sorted(run.data.params["seed"] for run in children) == ["0", "1"]
    assert len({(run.data.params["a"], run.data.params["N"]) for run in children}) == 1  # the same point, twice
    registered = client.get_registered_model("multi-robust-vision")
    assert "best" in registered.aliases
    monkeypatch.setattr(sys, "argv", ["platform.compare", "--experiment", "multi", "--tracking-uri", uri])
    assert compare.main() == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"\| 2 \| 2 \| [0-9.]+ ± [0-9.]+ \[[0-9.]+, [0-9.]+\] \|", row)  # trials, seeds, clean/tr1: mean ± std [interval]


def test_same_file_and_seed_suggest_the_same_first_trials():
    from platform.search import searcher

    spec = parse_sweep_spec(tiny_sweep("/x.safetensors", "seeded"), "s.yaml")

    def first_suggestions():
        search = searcher(spec, "study").searcher
        from platform.search import tune_space

        search.set_search_properties(None, None, tune_space(spec))
        return [search.suggest(f"t{i}") for i in range(3)]

    assert first_suggestions() == first_suggestions()


def test_ray_job_submit_runs_a_sweep_on_a_cluster(random_tiny_clip_weights, tmp_path):
    data = tiny_sweep(random_tiny_clip_weights, "submitted", algorithm="grid", num_trials=None)
    data["space"] = {"a": {"distribution": "choice", "values": [0.002]}}
    data["experiment"]["epochs"] = 1
    data["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    data["storage"] = {"path": str(tmp_path / "ray")}
    sweep_file = tmp_path / "submitted.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    import ray

    # `ray stop --force` below stops every Ray process on this machine: disconnect the shared
    # in-process instance first, or its dead raylet would take the test process down with it.
    ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ports = ["--port", "6391", "--dashboard-port", "8276", "--ray-client-server-port", "10002", "--min-worker-port", "20000", "--max-worker-port", "20100"]
    subprocess.run(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--num-cpus", "2", *ports],
                   check=True, env=env, capture_output=True, timeout=180)
    submit = ["ray", "job", "submit", "--address", "http://127.0.0.1:8276", "--working-dir", ".",
              "--runtime-env-json", json.dumps({"excludes": [".git", "ray_results", "mlartifacts", "*.db", ".hypothesis", "mlruns"]}),
              "--", "python", "-m", "platform.sweep", "--space", str(sweep_file)]
    try:
        # `ray start` returns before the head's job agent has registered; on a loaded machine the first
        # submission can be refused with "No available agent". Wait for the agent (bounded), not longer.
        deadline = time.time() + 120
        while True:
            result = subprocess.run(submit, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
                break
            time.sleep(5)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert "succeeded" in result.stdout
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    client = MlflowClient(data["tracking"]["uri"])
    assert [r.info.status for r in trial_runs(client, "submitted")] == ["FINISHED"]
