"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): two-worker trials span two nodes, survive a lost node.

The cluster is Ray's own multi-node test harness: a head and two worker nodes, each a
raylet of **one CPU**, so a trial's two Ray Train workers (``cpus_per_worker: 1``) can
only run on two different nodes (the trial's own launcher holds no CPU, only a token of
logical memory). Storage is one temporary folder every node reads and writes, as an NFS mount is
on a real cluster; MLflow is a SQLite file. Each worker group records the node of every
rank in its results (``worker_nodes``), which the test compares with the cluster's nodes.

One ``ray job submit`` to the head's dashboard: the job's driver attaches to the cluster and
runs a sweep of one two-worker trial across two nodes. Once epoch 1 is in MLflow, a node
holding a worker is removed (its processes SIGKILLed) and a fresh node added: Ray Train
restarts the worker group on two live nodes from the last checkpoint, the
MLflow run is the same run, every epoch is recorded exactly once, and ``ray job logs``
shows Tune's trial table. (One job tests both: a separate job without the loss cost
another minute of the suite.)

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

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO_ROOT
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


# ---------------------------------------------------------------------------------------------
# `ray job submit` to the cluster: a two-worker trial on two nodes, one of them lost mid-trial; the trial
# resumes from its last checkpoint on two live nodes, in the same MLflow run; Tune's table
# is in `ray job logs`
# ---------------------------------------------------------------------------------------------


def test_a_job_on_the_cluster_trains_across_two_nodes_and_a_lost_node_resumes_in_the_same_run(cluster, random_tiny_clip_weights, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    epochs = 3
    data = two_worker_sweep(random_tiny_clip_weights, "node-loss", epochs=epochs, algorithm="grid", num_trials=None)
    data["space"] = {"a": {"distribution": "choice", "values": [0.002]}}  # one two-worker trial: what both halves need
    data["experiment"].update(train_data="synthetic:train,n=24", pgd_steps=2)  # epochs of seconds: the loss lands inside one
    data["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    data["storage"] = {"path": str(tmp_path / "shared")}
    assert parse_sweep_spec(data, "node-loss.yaml").resources.max_failures == 1
    sweep_file = tmp_path / "node-loss.yaml"
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
        ["ray", "job", "submit", "--no-wait", "--address", address, "--submission-id", job_id, "--runtime-env-json", json.dumps(runtime_env),
         "--", "python", "-m", "platform.sweep", "--space", str(sweep_file)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    jobs = JobSubmissionClient(address)

    def job_ended():
        return jobs.get_job_status(job_id) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    # The loss: after epoch 1 reached MLflow, the worker node holding a rank (never the head: it holds the GCS and
    # the job's driver) is SIGKILLed with every process on it, and a new node joins. (From this process's main
    # thread: Ray starts and stops a node's processes only there.)
    client = MlflowClient(data["tracking"]["uri"])
    wait_for(lambda: any(epoch_steps(client, r.info.run_id) for r in trial_runs(client, "node-loss")) or job_ended(),
             "epoch 1 in MLflow", every=0.2)
    workers = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    on = {w.node_id for w in workers}
    assert len(workers) == WORKERS and len(on) == WORKERS, (workers, jobs.get_job_logs(job_id)[-4000:])
    victim = next(n for n in cluster.worker_nodes if n.node_id in on)
    removed = victim.node_id
    cluster.remove_node(victim, allow_graceful=False)
    added = cluster.add_node(num_cpus=1).node_id
    wait_for(job_ended, "the job to end", timeout=800)
    logs = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True, timeout=120)
    assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs.stdout[-4000:]
    assert removed not in alive_node_ids() and added in alive_node_ids()

    # `ray job logs`: Tune's trial table (verbose=1), its status line and one row for the trial, then the platform's summary.
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert "Trial status: 1 TERMINATED" in logs.stdout, logs.stdout[-4000:]
    assert len({line.split()[1] for line in logs.stdout.splitlines() if line.startswith("│ run_trial_")}) == 1, logs.stdout[-4000:]
    assert "sweep node-loss-" in logs.stdout and "1 trials in" in logs.stdout

    # MLflow: one run for the trial, before and after the loss, each epoch once, under the finished parent.
    [run] = trial_runs(client, "node-loss")
    [parent] = client.search_runs([run.info.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert parent.info.status == "FINISHED" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags[SWEEP_TAG] == parent.data.tags[SWEEP_TAG]
    for metric in (EPOCH, "train/loss", "train/l_cms"):
        assert epoch_steps(client, run.info.run_id, metric) == list(range(1, epochs + 1)), metric
    assert epoch_steps(client, run.info.run_id, "pgd/eps4/tr1") == [epochs]

    # Tune's results: every worker group ran its two ranks on two nodes of the cluster; the first included the lost
    # node; the restarted one started from a checkpoint of an epoch already done, on two live nodes.
    results = [r for r in tune_results(tmp_path / "shared") if EPOCH in r]
    trained = [r[EPOCH] for r in results if not r[REPLAYED_KEY]]
    assert trained == list(range(1, epochs + 1))  # no epoch trained twice, none skipped
    for r in results:
        ranks = r[WORKER_NODES_KEY].split(",")
        assert len(ranks) == WORKERS and len(set(ranks)) == WORKERS, ranks
    first, restarted = results[0], [r for r in results if r[RESUMED_FROM_KEY] > 0]
    assert first[RESUMED_FROM_KEY] == 0 and removed in first[WORKER_NODES_KEY].split(",")
    assert restarted and all(r[EPOCH] >= r[RESUMED_FROM_KEY] >= 1 for r in restarted)
    # Where the restarted group lands is Ray's choice: any two of the three live one-CPU nodes (head, survivor, new);
    # what must hold is that no rank is on the lost node and every rank is on a node alive after the loss.
    alive = alive_node_ids()
    for r in restarted:
        ranks = r[WORKER_NODES_KEY].split(",")
        assert removed not in ranks and set(ranks) <= alive, (ranks, alive)
    history = [(r[EPOCH], r[RESUMED_FROM_KEY], r[REPLAYED_KEY], r[WORKER_NODES_KEY]) for r in results]
    print(f"node-loss history (epoch, resumed_from, replayed, nodes): {history}; removed {removed}, added {added}; "
          f"run {run.info.run_id}; head {cluster.head_node.node_id}")
