"""Sweeps against a real MLflow tracking server on 127.0.0.1, as a cluster uses one.

``mlflow server --serve-artifacts`` (artifacts proxied over HTTP), over SQLite and over
PostgreSQL (Debian's server, started here in a temporary data directory on a loopback
port, as a non-root user): what a cluster runs.

- Over SQLite: a one-trial, one-epoch sweep (seconds) is recorded through the server.
- Over PostgreSQL: one two-trial sweep of two-DDP-worker trials (``workers_per_trial: 2``)
  runs through the server, which is killed twice: a short outage is waited out; a long one
  stops the driver with a message naming the server, and ``--resume`` completes the sweep.
  (One sweep tests both the records and the outage: a separate recorded sweep through its
  own server cost another minute of the suite.)

Either way the server then holds the parent run, every child, each per-epoch metric once,
the safetensors checkpoint and its card behind the artifact proxy, and the registered best
model; PostgreSQL holds the rows.
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
from platform.tracking import ROLE_TAG, sha256_of
from trainables.names import CARD_FILE, EFFECTIVE_BATCH_SIZE, EPOCH, RANKS_FILE, VISION_FILE
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
# What a sweep through the server must hold: parent, children, per-epoch metrics, the checkpoint and
# its card behind the server's artifact proxy, the registered best; and PostgreSQL holds the rows
# ---------------------------------------------------------------------------------------------


def checkpoints_of(storage: Path, trial_id: str) -> int:
    return len(list(storage.glob(f"*-train-{trial_id}/checkpoint_*")))


class WorkerWatch:
    """The most Ray Train workers seen at once under a driver process (polled every 0.5 s until stopped)."""

    def __init__(self, driver: Driver):
        self.most, self._done = 0, threading.Event()
        root = psutil.Process(driver.process.pid)

        def count():
            while not self._done.is_set():
                try:
                    self.most = max(self.most, len(ray_train_workers(root)))
                except psutil.NoSuchProcess:  # the driver ended
                    return
                time.sleep(0.5)

        self._thread = threading.Thread(target=count, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._done.set()
        self._thread.join(timeout=10)
        return self.most


def check_served(client: MlflowClient, runs: list, name: str, epochs: int, served: Path, workers: int = WORKERS) -> None:
    """Every child's settings, per-epoch metrics and checkpoint (through the server's artifact proxy); the registered best."""
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["batch_size"] == str(BATCH) and run.data.params[EFFECTIVE_BATCH_SIZE] == str(BATCH * workers)
        for metric in (EPOCH, "train/loss", "train/l_cms"):
            assert epoch_steps(client, run.info.run_id, metric) == list(range(1, epochs + 1)), (run.info.run_id, metric)
        assert epoch_steps(client, run.info.run_id, "pgd/eps4/tr1") == [epochs]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
            f"checkpoint/{CARD_FILE}", f"checkpoint/{RANKS_FILE}", f"checkpoint/{VISION_FILE}"]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server, not a path of this machine
    best = client.get_model_version_by_alias(f"{name}-robust-vision", "best")
    assert best.run_id in {r.info.run_id for r in runs}
    local = Path(client.download_artifacts(best.run_id, "checkpoint", str(served.parent / f"download-{best.run_id}")))
    card = json.loads((local / CARD_FILE).read_text())
    assert card["sha256"] == sha256_of(local / VISION_FILE)
    assert list(served.rglob(f"{best.run_id}/artifacts/checkpoint/{VISION_FILE}"))  # stored where the server keeps them


def check_parent(client: MlflowClient, runs: list):
    """The sweep's parent run: FINISHED, and the parent of every child. Returns it."""
    [parent] = client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert parent.info.status == "FINISHED" and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    return parent


def served_contents(client: MlflowClient, parent, runs: list) -> dict:
    """The parent, each child's status, settings, per-epoch history and artifacts, and the registered versions (a summary)."""
    def history(run_id: str, metric: str) -> list:
        return [(m.step, round(m.value, 4)) for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]

    return {"parent": {"run_id": parent.info.run_id, "status": parent.info.status},
            "children": [{"run_id": r.info.run_id, "status": r.info.status, "parent": r.data.tags["mlflow.parentRunId"],
                          "params": {k: r.data.params[k] for k in ("batch_size", EFFECTIVE_BATCH_SIZE, "a") if k in r.data.params},
                          **{metric: history(r.info.run_id, metric) for metric in (EPOCH, "train/loss", "pgd/eps4/tr1")},
                          "artifacts": [a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")]} for r in runs],
            "registered": [{"name": v.name, "version": v.version, "run_id": v.run_id, "aliases": list(v.aliases)}
                           for v in client.search_model_versions("name = 'outage-robust-vision'")]}


def check_postgresql(backend_uri: str, parent, runs: list, epochs: int) -> None:
    """The records are in PostgreSQL itself, not in a file beside the server: each epoch once, one model version."""
    import psycopg2

    ids = tuple(r.info.run_id for r in runs)
    with psycopg2.connect(backend_uri.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE run_uuid IN %s AND status = 'FINISHED'", ((parent.info.run_id, *ids),))
        assert cursor.fetchone()[0] == 1 + len(ids)
        cursor.execute("SELECT run_uuid, count(*) FROM metrics WHERE run_uuid IN %s AND key = %s GROUP BY run_uuid", (ids, EPOCH))
        assert dict(cursor.fetchall()) == {run_id: epochs for run_id in ids}
        cursor.execute("SELECT count(*) FROM model_versions WHERE run_id IN %s", (ids,))
        assert cursor.fetchone()[0] == 1


# ---------------------------------------------------------------------------------------------
# A sweep through a server over SQLite: the embedded store's database, served as a cluster serves it
# ---------------------------------------------------------------------------------------------


def test_a_sweep_through_a_server_over_sqlite_is_recorded_behind_its_artifact_proxy(ray_session, random_tiny_clip_weights, tmp_path):
    server = serve(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        data = tiny_sweep(random_tiny_clip_weights, "served-sqlite", epochs=1)
        data["experiment"]["batch_size"] = BATCH
        summary = run_sweep(parse_sweep_spec(data, "served-sqlite.yaml"), tracking_uri=server.uri, storage_path=str(tmp_path / "ray"))
        client = MlflowClient(server.uri)
        runs = trial_runs(client, "served-sqlite")
        assert [r.info.run_id for r in runs] == [summary["registered"][0]["run_id"]]
        assert check_parent(client, runs).info.run_id == summary["parent_run_id"]
        check_served(client, runs, "served-sqlite", 1, server.artifacts, workers=1)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# A sweep of two-worker trials through a server on PostgreSQL, the server killed mid-sweep: a short
# outage is waited out, a long one stops the driver with a message naming the server, and --resume
# completes the sweep with nothing lost or repeated
# ---------------------------------------------------------------------------------------------

# The driver's MLflow retry budget in this test: 5 retries with backoff up to 4 s, 8 s, 16 s, 32 s (about
# 60 s; MLflow's default 7 retries make about 4 min). A restarted server answered in about 13 s on an idle
# machine, but 4 retries (about 30 s) once ran out during the short outage in CI (2026-12-04): the epochs
# take a second each, so the outage is mostly the restart, which a busy 2-core machine slows.
RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2"}


def test_a_killed_tracking_server_is_waited_for_then_named_and_resume_loses_nothing(postgres, random_tiny_clip_weights, tmp_path, monkeypatch):
    backend_uri = postgres("outage")
    server = serve(backend_uri, tmp_path)
    epochs = 3
    data = tiny_sweep(random_tiny_clip_weights, "outage", epochs=epochs, num_trials=2)  # one trial at a time
    data["experiment"].update(train_data="synthetic:train,n=36", pgd_steps=3, batch_size=BATCH)  # epochs of a few seconds
    data["resources"].update(workers_per_trial=WORKERS, cpus_per_worker=0.5)  # two DDP workers, as a cluster trains
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
        watch = WorkerWatch(driver)
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
        assert watch.stop() == WORKERS  # the trials really trained on two DDP workers
        runs = trial_runs(client, "outage")
        assert sorted(r.info.run_id for r in runs) == sorted([first.info.run_id, second.info.run_id])
        parent = check_parent(client, runs)
        check_served(client, runs, "outage", epochs, server.artifacts)
        check_postgresql(backend_uri, parent, runs, epochs)
        if os.environ.get("MAVA_SCREENSHOT_DIR"):  # what the server holds, for the issue note
            Path(os.environ["MAVA_SCREENSHOT_DIR"], "postgresql-sweep.json").write_text(json.dumps(served_contents(client, parent, runs), indent=1))
    finally:
        for running in drivers:  # a failed check must not leave a sweep running
            if running.process.poll() is None:
                running.process.kill()
                running.wait()
        server.stop()
