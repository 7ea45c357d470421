"""Sweeps against a real MLflow tracking server on 127.0.0.1, as a cluster uses one.

``mlflow server --serve-artifacts`` (artifacts proxied over HTTP) over PostgreSQL
(Debian's server, started here in a temporary data directory on a loopback port, as a
non-root user): what a cluster runs. The embedded SQLite store is what every other sweep
test records into; a server over SQLite adds nothing PostgreSQL does not test, so it is
not run (it took a minute of the suite). Each holds the parent run, every child, per-epoch metrics,
the safetensors checkpoint and its card, and the registered best model. Trials run two
DDP workers (``workers_per_trial: 2``). Then the server is killed mid-sweep: a short
outage is waited out; a long one stops the driver with a message naming the server,
and ``--resume`` completes the sweep with nothing lost or duplicated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

# MLflow's telemetry thread unsets an environment variable while HTTP requests iterate os.environ
# (a KeyError in requests' proxy lookup); these tests are the first to talk HTTP to a server.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.tracking import MlflowClient  # noqa: E402

from platform.sweep import run_sweep
from platform.sweep_spec import parse_sweep_spec
from platform.tracking import ROLE_TAG, SWEEP_TAG, sha256_of
from trainables.names import EFFECTIVE_BATCH_SIZE, EPOCH
from test_reliability import Driver, epoch_steps, ray_train_workers, tiny_sweep, trial_runs, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # a server start, a sweep and its Ray: minutes on a busy machine

LOOPBACK = "127.0.0.1"
BATCH = 6
WORKERS = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Servers: PostgreSQL and mlflow server, each on 127.0.0.1, stopped by their fixture
# ---------------------------------------------------------------------------------------------


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(found[-1]) if isinstance(found, list) and found else (found or None)


def ensure_postgresql() -> None:
    """Debian's postgresql server; installed with apt-get when missing (CI runs as root with Debian mirrors)."""
    if postgres_bin("initdb") and postgres_bin("pg_ctl"):
        return
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed and installing it needs root: run apt-get install -y postgresql")
    result = subprocess.run("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql", shell=True,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0 or not postgres_bin("initdb"):
        pytest.fail(f"could not install postgresql (apt-get exit code {result.returncode}); install it with "
                    f"`apt-get update && apt-get install -y postgresql`:\n{(result.stdout + result.stderr)[-2000:]}")


def as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the ``postgres`` user the package creates."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary data directory; yields ``create(name) -> URI`` of a new database."""
    import psycopg2

    ensure_postgresql()
    root = Path(tempfile.mkdtemp(prefix="mava-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    subprocess.run(as_server_user([postgres_bin("initdb"), "-D", str(data), "-U", "mava", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=300)
    options = f"-c listen_addresses={LOOPBACK} -p {port} -k {data}"
    subprocess.run(as_server_user([postgres_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "120", "start"]),
                   check=True, capture_output=True, timeout=180)
    base = f"mava@{LOOPBACK}:{port}"

    def create(name: str) -> str:
        connection = psycopg2.connect(f"postgresql://{base}/postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return f"postgresql+psycopg2://{base}/{name}"  # SQLAlchemy's default PostgreSQL driver is psycopg 3; ours is psycopg2

    try:
        yield create
    finally:
        subprocess.run(as_server_user([postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


class TrackingServer:
    """``mlflow server --serve-artifacts`` on 127.0.0.1: start, kill (SIGKILL, as a crash), start again on the same port."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, log
        self.port = free_port()
        self.uri = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            # Its own process group: the server's workers go with it when it is killed.
            self.process = subprocess.Popen(
                ["mlflow", "server", "--backend-store-uri", self.backend_uri, "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
                 "--host", LOOPBACK, "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._healthy, f"the MLflow server at {self.uri} (log: {self.log})", timeout=300)

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"mlflow server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def serve(backend_uri: str, folder: Path):
    server = TrackingServer(backend_uri, folder / "served-artifacts", folder / "mlflow-server.log")
    server.start()
    return server


# ---------------------------------------------------------------------------------------------
# A sweep with two-worker trials, recorded through the server
# ---------------------------------------------------------------------------------------------


def server_sweep(weights, name: str, epochs: int = 1, **search) -> dict:
    data = tiny_sweep(weights, name, epochs=epochs, **search)
    data["experiment"]["batch_size"] = BATCH
    data["resources"].update(workers_per_trial=WORKERS, cpus_per_worker=0.5)
    return data


def check_recorded(client: MlflowClient, summary: dict, name: str, epochs: int, served: Path) -> None:
    """Parent, child, per-epoch metrics, checkpoint + card (through the server's artifact proxy), registered best."""
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags[ROLE_TAG] == "sweep" and parent.info.status == "FINISHED"
    [child] = [r for r in trial_runs(client, name) if r.data.tags[SWEEP_TAG] == summary["sweep_id"]]
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["batch_size"] == str(BATCH) and child.data.params[EFFECTIVE_BATCH_SIZE] == str(BATCH * WORKERS)
    for metric in (EPOCH, "train/loss", "train/l_cms"):
        assert epoch_steps(client, child.info.run_id, metric) == list(range(1, epochs + 1)), metric
    assert epoch_steps(client, child.info.run_id, "pgd/eps4/tr1") == [epochs]
    assert child.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server, not a path of this machine
    local = Path(client.download_artifacts(child.info.run_id, "checkpoint", str(served.parent / f"download-{child.info.run_id}")))
    card = json.loads((local / "card.json").read_text())
    assert card["sha256"] == sha256_of(local / "vision.safetensors")
    assert list(served.rglob(f"{child.info.run_id}/artifacts/checkpoint/vision.safetensors"))  # stored where the server keeps them
    version = client.get_model_version_by_alias(f"{name}-robust-vision", "best")
    assert version.run_id == child.info.run_id == summary["registered"]["run_id"]


def run_watching_workers(spec, uri: str, storage: Path) -> tuple[dict, int]:
    """``run_sweep`` in this process; returns its summary and the most Ray Train workers seen at once."""
    most, done = [0], threading.Event()

    def count():
        while not done.is_set():
            most[0] = max(most[0], len(ray_train_workers(psutil.Process())))
            time.sleep(0.5)

    watcher = threading.Thread(target=count, daemon=True)
    watcher.start()
    try:
        summary = run_sweep(spec, tracking_uri=uri, storage_path=str(storage))
    finally:
        done.set()
        watcher.join(timeout=10)
    return summary, most[0]


def test_a_two_worker_sweep_is_recorded_by_a_postgresql_tracking_server(postgres, ray_session, random_tiny_clip_weights, tmp_path):
    backend_uri = postgres("server_sweep")
    server = serve(backend_uri, tmp_path)
    try:
        name = "served-postgresql"
        spec = parse_sweep_spec(server_sweep(random_tiny_clip_weights, name), f"{name}.yaml")
        summary, workers = run_watching_workers(spec, server.uri, tmp_path / "ray")
        assert workers == WORKERS  # the trial really trained on two DDP workers
        check_recorded(MlflowClient(server.uri), summary, name, 1, server.artifacts)
    finally:
        server.stop()
    # The records are in PostgreSQL itself, not in a file beside the server.
    import psycopg2

    with psycopg2.connect(backend_uri.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid IN (%s, %s)", (summary["parent_run_id"], summary["registered"]["run_id"]))
        assert cursor.fetchone()[0] == 2
        cursor.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = %s", (summary["registered"]["run_id"], EPOCH))
        assert cursor.fetchone()[0] == 1
        cursor.execute("SELECT count(*) FROM model_versions WHERE run_id = %s", (summary["registered"]["run_id"],))
        assert cursor.fetchone()[0] == 1


# ---------------------------------------------------------------------------------------------
# The tracking server killed mid-sweep: a short outage is waited out, a long one stops the driver
# with a message naming the server, and --resume completes the sweep with nothing lost or repeated
# ---------------------------------------------------------------------------------------------

# The driver's MLflow retry budget in this test: 4 retries with backoff 2 s, 4 s, 8 s, 16 s (about 30 s;
# MLflow's default 7 retries make about 4 min). A restarted server answered in about 13 s on an idle machine.
RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}  # about 30 s: the server restarts in about 13 s


def checkpoints_of(storage: Path, trial_id: str) -> int:
    return len(list(storage.glob(f"*-train-{trial_id}/checkpoint_*")))


def test_a_killed_tracking_server_is_waited_for_then_named_and_resume_loses_nothing(postgres, random_tiny_clip_weights, tmp_path, monkeypatch):
    server = serve(postgres("outage"), tmp_path)
    epochs = 3
    data = tiny_sweep(random_tiny_clip_weights, "outage", epochs=epochs, num_trials=2)  # one trial at a time
    data["experiment"].update(train_data="synthetic:train,n=36", pgd_steps=3)  # epochs of a few seconds
    data["tracking"] = {"uri": server.uri}
    data["storage"] = {"path": str(tmp_path / "ray")}
    sweep_file = tmp_path / "outage.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    storage = tmp_path / "ray"
    for key, value in RETRIES.items():
        monkeypatch.setenv(key, value)  # the drivers inherit them
    client = MlflowClient(server.uri)
    drivers: list[Driver] = []
    try:
        driver = Driver("--space", str(sweep_file))
        drivers.append(driver)
        # 1. A short outage: killed after the first trial's first epoch reached MLflow, restarted once the trial has
        #    trained on (its next epoch's checkpoint: Tune is not held up by the writes waiting for the server).
        [first] = wait_for(lambda: [r for r in trial_runs(client, "outage") if epoch_steps(client, r.info.run_id)], "a first epoch in MLflow")
        first_trial = first.data.tags["mava.trial_id"]
        server.kill()
        wait_for(lambda: checkpoints_of(storage, first_trial) >= 2 or driver.process.poll() is not None, "the next epoch's checkpoint")
        server.start()
        # The driver waited and continued: the first trial's run is finished, its history whole.
        wait_for(lambda: client.get_run(first.info.run_id).info.status == "FINISHED" or driver.process.poll() is not None, "the first trial to finish")
        assert driver.process.poll() is None, driver.output[-4000:]
        assert epoch_steps(client, first.info.run_id) == list(range(1, epochs + 1))

        # 2. A long outage: killed once the second trial's first epoch is in MLflow, not restarted until the driver
        #    has given up (at a callback, or waiting for its queued writes after the last trial).
        second = wait_for(lambda: [r for r in trial_runs(client, "outage") if r.info.run_id != first.info.run_id and epoch_steps(client, r.info.run_id)],
                          "the second trial's first epoch in MLflow")[0]
        server.kill()
        code = driver.wait()
        assert code == 2, driver.output[-4000:]
        message = re.search(rf"error: the MLflow tracking server at {re.escape(server.uri)} stopped answering during sweep (\S+) .*"
                            r"start the server again, then continue with --resume (\S+)", driver.output)
        assert message and message.group(1) == message.group(2), driver.output[-4000:]
        assert "Traceback" not in driver.output.split("error: the MLflow tracking server")[-1]

        # 3. Server back, --resume: every planned trial once, every epoch once, the same runs (a trial that ended during
        #    the outage is finished in Tune's state: its end comes from its final result in storage).
        server.start()
        resumed = Driver("--space", str(sweep_file), "--resume", message.group(1))
        drivers.append(resumed)
        assert resumed.wait() == 0, resumed.output[-4000:]
        runs = trial_runs(client, "outage")
        assert sorted(r.info.run_id for r in runs) == sorted([first.info.run_id, second.info.run_id])
        for run in runs:
            assert run.info.status == "FINISHED"
            for metric in (EPOCH, "train/loss"):
                assert epoch_steps(client, run.info.run_id, metric) == list(range(1, epochs + 1)), (run.info.run_id, metric)
            assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
                "checkpoint/card.json", "checkpoint/eval_ranks.parquet", "checkpoint/vision.safetensors"]
        parents = client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert client.get_model_version_by_alias("outage-robust-vision", "best").run_id in {first.info.run_id, second.info.run_id}
    finally:
        for running in drivers:  # a failed check must not leave a sweep running
            if running.process.poll() is None:
                running.process.kill()
                running.wait()
        server.stop()
