"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): two-worker trials span two nodes, survive a lost node.

The cluster is Ray's own multi-node test harness: a head and two worker nodes, each a
raylet of **one CPU**, so a trial's two Ray Train workers (``cpus_per_worker: 1``) can
only run on two different nodes (the trial's own launcher holds no CPU, only a token of
logical memory). Storage is one temporary folder every node reads and writes, as an NFS mount is
on a real cluster; MLflow is a SQLite file. Each worker group records the node of every
rank in its results (``worker_nodes``), which the tests compare with the cluster's nodes.

1. ``ray job submit`` to the head's dashboard: the job's driver attaches to the cluster,
   runs a sweep of two-worker trials across two nodes, and ``ray job logs`` shows Tune's
   trial table; every child run is in MLflow.
2. A node holding a worker is removed (its processes SIGKILLed) after epoch 1's
   checkpoint and a fresh node added: Ray Train restarts the worker group on the
   remaining and the new node from the last checkpoint, the MLflow run is the same run,
   and every epoch is recorded exactly once.

The Cluster needs a Ray of its own: the module fixture disconnects the session's Ray
first (``run_sweep`` starts a local one again for later tests, as after the job-submit
test of ``test_sweep.py``) and shuts its nodes down after the last test.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT
from platform.sweep import run_sweep
from platform.sweep_spec import parse_sweep_spec
from platform.tracking import ROLE_TAG, SWEEP_TAG
from test_reliability import epoch_steps, tiny_sweep, trial_runs, tune_results, wait_for
from trainables.names import EPOCH
from trainables.ray_worker import REPLAYED_KEY, RESUMED_FROM_KEY, WORKER_NODES_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a cluster of three raylets and two sweeps: minutes on a busy machine

LOOPBACK = "127.0.0.1"
WORKERS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes of one CPU each, on 127.0.0.1 ports no other Ray here uses; this process connected."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, if a test started it: one process talks to one Ray
    head = {"num_cpus": 1, "gcs_server_port": free_port(), "include_dashboard": True,
            "dashboard_host": LOOPBACK, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()}
    nodes = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def alive_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def two_worker_sweep(weights, name: str, epochs: int, **search) -> dict:
    data = tiny_sweep(weights, name, epochs=epochs, **search)
    data["resources"].update(workers_per_trial=WORKERS, cpus_per_worker=1)
    return data


def placements(storage: Path) -> list[list[str]]:
    """The node ids of each rank, per result Tune received (from the trials' result.json)."""
    return [row[WORKER_NODES_KEY].split(",") for row in tune_results(storage) if WORKER_NODES_KEY in row]


# ---------------------------------------------------------------------------------------------
# `ray job submit` to the cluster: two-worker trials on two nodes, Tune's table in `ray job logs`
# ---------------------------------------------------------------------------------------------


def test_a_job_submitted_to_the_cluster_runs_two_worker_trials_across_two_nodes(cluster, random_tiny_clip_weights, tmp_path):
    data = two_worker_sweep(random_tiny_clip_weights, "multinode-job", epochs=1, algorithm="grid", num_trials=None)
    data["space"] = {"a": {"distribution": "choice", "values": [0.002]}}  # one two-worker trial: what the job path needs
    data["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    data["storage"] = {"path": str(tmp_path / "shared")}
    sweep_file = tmp_path / "multinode-job.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    address = f"http://{cluster.webui_url}" if "://" not in cluster.webui_url else cluster.webui_url
    job_id = f"mava-multinode-{secrets.token_hex(4)}"
    # The cluster's processes inherited this process's RAY_AUTH_MODE (an earlier local ray.init in the session turns
    # token authentication on and writes ~/.ray/auth_token); the CLI inherits the same mode and finds the same token.
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # No --working-dir here (docs/cluster.md uses one): this cluster's nodes share one machine's Ray session folder,
    # and a node that unpacks the job's working-dir package replaces the folder the driver runs in (the driver then
    # fails in os.getcwd()). The repository is on every "node" already: PYTHONPATH puts it on the job's path.
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    submit = subprocess.run(
        ["ray", "job", "submit", "--address", address, "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env),
         "--", "python", "-m", "platform.sweep", "--space", str(sweep_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=800)
    assert submit.returncode == 0 and "succeeded" in submit.stdout, (submit.stdout + submit.stderr)[-4000:]

    logs = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr[-2000:]
    # Tune's trial table (verbose=1): its status line and a row per trial, then the platform's own summary.
    assert "Trial status: 1 TERMINATED" in logs.stdout, logs.stdout[-4000:]
    assert len({line.split()[1] for line in logs.stdout.splitlines() if line.startswith("│ run_trial_")}) == 1, logs.stdout[-4000:]
    assert "sweep multinode-job-" in logs.stdout and "1 trials in" in logs.stdout

    client = MlflowClient(data["tracking"]["uri"])
    runs = trial_runs(client, "multinode-job")
    [parent] = client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert parent.info.status == "FINISHED" and len(runs) == 1
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert epoch_steps(client, run.info.run_id) == [1]
    # Each trial's two ranks ran on two different nodes of this cluster.
    placed = placements(tmp_path / "shared")
    assert len(placed) == 1, placed
    for ranks in placed:
        assert len(ranks) == WORKERS and len(set(ranks)) == WORKERS and set(ranks) <= alive_node_ids(), ranks


# ---------------------------------------------------------------------------------------------
# A node lost mid-trial: the trial resumes from its last checkpoint on the remaining and a new node
# ---------------------------------------------------------------------------------------------


def test_a_lost_node_resumes_its_trial_from_the_last_checkpoint_in_the_same_run(cluster, random_tiny_clip_weights, tmp_path):
    from ray.util.state import list_actors

    epochs = 3
    data = two_worker_sweep(random_tiny_clip_weights, "node-loss", epochs=epochs)
    data["experiment"].update(train_data="synthetic:train,n=24", pgd_steps=2)  # epochs of seconds: the loss lands inside one
    spec = parse_sweep_spec(data, "node-loss.yaml")
    assert spec.resources.max_failures == 1
    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "shared"
    head_id = cluster.head_node.node_id
    outcome: dict = {}

    def sweep():
        try:
            outcome["summary"] = run_sweep(spec, tracking_uri=uri, storage_path=str(storage))
        except BaseException as error:  # handed to the test thread, which raises it
            outcome["error"] = error

    # The sweep runs in a thread: Ray starts (and stops) a node's processes only from the main thread, where it can
    # install its signal handlers, so the node is lost and replaced from here.
    driver = threading.Thread(target=sweep, daemon=True)
    driver.start()
    client = MlflowClient(uri)
    wait_for(lambda: any(epoch_steps(client, r.info.run_id) for r in trial_runs(client, "node-loss")) or not driver.is_alive(),
             "epoch 1 in MLflow", every=0.2)
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    on = {w.node_id for w in workers}
    assert len(workers) == WORKERS and len(on) == WORKERS, (workers, outcome)
    # A worker node holding a rank (never the head: it holds the GCS and this driver).
    victim = next(n for n in cluster.worker_nodes if n.node_id in on)
    removed = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)  # SIGKILL of its raylet and every process on it
    added = cluster.add_node(num_cpus=1).node_id
    driver.join(timeout=800)
    assert not driver.is_alive() and "error" not in outcome, outcome
    summary = outcome["summary"]
    assert removed not in alive_node_ids() and added in alive_node_ids()

    [row] = summary["rows"]
    assert row["status"] == "OK" and row["epochs"] == epochs
    [run] = trial_runs(client, "node-loss")  # one MLflow run for the trial, before and after the loss
    assert run.data.tags[SWEEP_TAG] == summary["sweep_id"] and run.info.status == "FINISHED"
    for metric in (EPOCH, "train/loss", "train/l_cms"):
        assert epoch_steps(client, run.info.run_id, metric) == list(range(1, epochs + 1)), metric
    assert epoch_steps(client, run.info.run_id, "pgd/eps4/tr1") == [epochs]

    results = [r for r in tune_results(Path(summary["storage_path"])) if EPOCH in r]
    trained = [r[EPOCH] for r in results if not r[REPLAYED_KEY]]
    assert trained == list(range(1, epochs + 1))  # no epoch trained twice, none skipped
    first, restarted = results[0], [r for r in results if r[RESUMED_FROM_KEY] > 0]
    assert first[RESUMED_FROM_KEY] == 0 and removed in first[WORKER_NODES_KEY].split(",")
    # The new worker group started from a checkpoint of an epoch already done, on the surviving and the new node.
    assert restarted and all(r[EPOCH] >= r[RESUMED_FROM_KEY] >= 1 for r in restarted)
    for r in restarted:
        ranks = r[WORKER_NODES_KEY].split(",")
        assert len(set(ranks)) == WORKERS and removed not in ranks and added in ranks, ranks
    history = [(r[EPOCH], r[RESUMED_FROM_KEY], r[REPLAYED_KEY], r[WORKER_NODES_KEY]) for r in results]
    print(f"node-loss history (epoch, resumed_from, replayed, nodes): {history}; removed {removed}, added {added}; "
          f"run {run.info.run_id}; head {head_id}")
