"""Reliability: faults a sweep survives, checks that stop a doomed sweep before compute, safe checkpoints, no leaks.

Each fault is real: a Ray Train worker process and a sweep driver are SIGKILLed, a
trial's loss really becomes NaN (lr = 1e30), the tracking server really is not there,
and a folder really cannot be created (it would sit below a regular file, which
stops root too). Sweeps run on the embedded default with random tiny-CLIP weights and
a tiny budget (synthetic data, n = 12).
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from conftest import REPO_ROOT
from platform.sweep import LOCAL_HOST, build_parser, run_sweep
from platform.sweep_spec import parse_sweep_spec
from platform.tracking import FAILURE_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG, write_card
from trainables.checkpoint import VISION_FILE
from trainables.errors import UserError
from trainables.models import load_model
from trainables.models.robust_checkpoint import load_robust_vision
from trainables.models.tiny_clip import build_tiny_clip
from trainables.models.weights import read_state_dict
from trainables.names import EFFECTIVE_BATCH_SIZE, EPOCH, EXAMPLES_ARTIFACT_DIR, RANKS_FILE
from trainables.ray_worker import REPLAYED_KEY, RESUMED_FROM_KEY

WAIT_SECONDS = 600  # generous: the machine is shared; every wait ends as soon as its event happens


def tiny_sweep(weights, name: str, epochs: int = 2, **search) -> dict:
    """A sweep that trains in seconds: 12 synthetic images, 1 PGD step, evaluation after the last epoch only."""
    return {
        "experiment": {"name": name, "model": f"tiny-clip@{weights}", "train_data": "synthetic:train,n=12",
                       "eval_data": "synthetic:test,n=6", "epochs": epochs, "batch_size": 6, "pgd_steps": 1, "eval_eps": ["4/255"],
                       "M": 2, "N": 1, "eval_every": 0, "examples": 0},  # no example pictures: not what these tests test
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 1, "max_failures": 1},
        "search": {"algorithm": "tpe", "num_trials": 1, "seed": 0, "objectives": [{"metric": "pgd/eps4/tr1", "mode": "max"}], **search},
        "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}},
    }


def trial_runs(client: MlflowClient, experiment_name: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")


def epoch_steps(client: MlflowClient, run_id: str, metric: str = EPOCH) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def tune_results(trial_storage: Path) -> list[dict]:
    """The results Tune received for the trials of a sweep (their result.json lines; a restored trial's start afresh)."""
    rows = []
    for path in sorted(trial_storage.rglob("result.json")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def ray_train_workers(root: psutil.Process) -> list[psutil.Process]:
    """Ray Train worker processes started under ``root`` (so never another session's Ray)."""
    found = []
    for process in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def wait_for(condition, what: str, timeout: float = WAIT_SECONDS, every: float = 0.5):
    """Poll ``condition`` until it returns something truthy (an event to wait for, not a retry of a failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# A Ray Train worker killed mid-epoch: the trial resumes from its checkpoint, one MLflow run, no gaps
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_train_worker_resumes_from_its_last_checkpoint(ray_session, random_tiny_clip_weights, tmp_path):
    epochs = 3
    data = tiny_sweep(random_tiny_clip_weights, "worker-kill", epochs=epochs)
    data["experiment"].update(train_data="synthetic:train,n=36", pgd_steps=3)  # epochs of a few seconds: the kill lands inside one
    spec = parse_sweep_spec(data, "worker-kill.yaml")
    assert spec.resources.max_failures == 1  # Ray Train's FailureConfig gets it from the sweep file
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed: list[int] = []
    failures: list[BaseException] = []

    def kill_a_worker_after_the_first_epoch():
        try:
            client = MlflowClient(uri)

            def first_epoch_recorded():
                return any(epoch_steps(client, r.info.run_id) for r in trial_runs(client, "worker-kill"))

            wait_for(first_epoch_recorded, "the first epoch in MLflow", every=0.2)
            workers = ray_train_workers(psutil.Process())
            assert len(workers) == 1, [w.cmdline() for w in workers]
            workers[0].send_signal(signal.SIGKILL)  # no cleanup, no exception in Python: the process is gone
            killed.append(workers[0].pid)
        except BaseException as error:  # handed to the test thread, which raises it
            failures.append(error)

    watcher = threading.Thread(target=kill_a_worker_after_the_first_epoch, daemon=True)
    watcher.start()
    summary = run_sweep(spec, tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    watcher.join(timeout=60)
    assert not failures, failures
    assert killed and not psutil.pid_exists(killed[0])

    [row] = summary["rows"]
    assert row["status"] == "OK" and row["epochs"] == epochs
    client = MlflowClient(uri)
    [run] = [r for r in trial_runs(client, "worker-kill") if r.data.tags[SWEEP_TAG] == summary["sweep_id"]]
    assert run.info.status == "FINISHED"
    for metric in (EPOCH, "train/loss", "train/l_cms"):
        assert epoch_steps(client, run.info.run_id, metric) == list(range(1, epochs + 1)), metric
    assert epoch_steps(client, run.info.run_id, "pgd/eps4/tr1") == [epochs]  # evaluated after the last epoch only
    assert client.list_artifacts(run.info.run_id, "checkpoint")

    results = tune_results(Path(summary["storage_path"]))
    trained = [r[EPOCH] for r in results if EPOCH in r and not r[REPLAYED_KEY]]
    assert trained == list(range(1, epochs + 1))  # no epoch trained twice, none skipped
    restarted = [r for r in results if r.get(RESUMED_FROM_KEY, 0) > 0]
    # The restarted worker began at the checkpoint of an epoch already done, not from scratch.
    assert restarted and all(r[RESUMED_FROM_KEY] >= 1 and r[EPOCH] >= r[RESUMED_FROM_KEY] for r in restarted)


# ---------------------------------------------------------------------------------------------
# The sweep driver SIGKILLed after a trial finished: --resume completes it, nothing lost or repeated
# ---------------------------------------------------------------------------------------------


class Driver:
    """``python -m platform.sweep`` in a subprocess, its output collected by a thread."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "platform.sweep", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = WAIT_SECONDS) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return code


TRAINING_PROCESSES = re.compile(r"RayTrainWorker|TrainController|run_trial|raylet|gcs_server")


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listening_addresses(root: psutil.Process, port: int) -> set[str]:
    pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.port == port}


def finished_runs(client: MlflowClient, experiment_name: str, at_least: int) -> list:
    """Wait until at least ``at_least`` trial runs have finished; returns the finished runs."""
    def enough():
        runs = [r for r in trial_runs(client, experiment_name) if r.info.status == "FINISHED"]
        return runs if len(runs) >= at_least else None
    return wait_for(enough, f"{at_least} finished trial(s)")


@pytest.mark.slow
def test_an_interrupted_then_killed_sweep_resumes_without_losing_or_repeating_a_trial(random_tiny_clip_weights, tmp_path):
    """One sweep of 2 trials, one at a time: Ctrl-C after the first trial, SIGKILL of the driver while the second
    trains, and ``--resume`` after each. Every trial is recorded once with each epoch once, and no finished trial
    runs again. (A third trial, to kill the driver between trials, cost 40 s of the suite and tested nothing more.)"""
    data = tiny_sweep(random_tiny_clip_weights, "interrupted", num_trials=2)
    data["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    data["storage"] = {"path": str(tmp_path / "ray")}
    sweep_file = tmp_path / "interrupted.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    client = MlflowClient(data["tracking"]["uri"])

    # 1. Ctrl-C once the first trial has finished: exit 130 with the command that continues the sweep.
    driver = Driver("--space", str(sweep_file))
    root = psutil.Process(driver.process.pid)
    # Services the platform starts stay on this machine: the dashboard listens on loopback only.
    dashboard = wait_for(lambda: re.search(r"View the dashboard at \S*?https?://([\d.]+):(\d+)", driver.output), "Ray's dashboard")
    assert dashboard.group(1) == LOCAL_HOST
    assert wait_for(lambda: listening_addresses(root, int(dashboard.group(2))), "the dashboard socket") == {LOCAL_HOST}
    finished_runs(client, "interrupted", 1)
    driver.process.send_signal(signal.SIGINT)
    assert driver.wait() == 130, driver.output[-4000:]
    assert re.search(r"was interrupted; finished trials are kept in MLflow\. Continue it with:\n.*--resume \S+", driver.output)

    # 2. Resume, then SIGKILL the driver while the second trial's Ray Train workers train.
    resumed = Driver("--space", str(sweep_file), "--resume")
    root = psutil.Process(resumed.process.pid)
    # (After its first epoch reached MLflow: Tune has saved the sweep's state since the trial began, at least every 10 s.)
    wait_for(lambda: ray_train_workers(root) and [r for r in trial_runs(client, "interrupted") if r.info.status != "FINISHED"
                                                  and epoch_steps(client, r.info.run_id)], "the second trial's first epoch in MLflow")
    training = [p for p in root.children(recursive=True) if TRAINING_PROCESSES.search(" ".join(_cmdline(p)))]
    assert any("raylet" in " ".join(_cmdline(p)) for p in training)
    dead_sweep = root.children(recursive=True)  # every process of its local Ray, agents included
    resumed.process.send_signal(signal.SIGKILL)
    assert resumed.wait() == -signal.SIGKILL
    # Ray's processes share the driver's fate: no worker of the dead sweep trains on beside the resumed one.
    _, alive = psutil.wait_procs(training, timeout=90)
    assert not alive, [_cmdline(p) for p in alive]
    # Ray's dashboard and runtime-env agents outlive it (they were still there 30 s later): the next --resume stops them.
    time.sleep(5)
    leftovers = [p for p in dead_sweep if _running(p)]
    finished = {r.data.tags[TRIAL_TAG]: r for r in trial_runs(client, "interrupted") if r.info.status == "FINISHED"}
    checkpoints = {trial: sorted((tmp_path / "ray").glob(f"*-train-{trial}/checkpoint_*")) for trial in finished}

    # 3. Resume again: the sweep completes with each planned trial recorded exactly once.
    last = Driver("--space", str(sweep_file), "--resume")
    wait_for(lambda: "View the dashboard at" in last.output or last.process.poll() is not None, "the last driver's Ray")
    # Stopped before the new Ray started: nothing of the killed sweep is left.
    assert not [(p.pid, _cmdline(p)) for p in dead_sweep if _running(p)], last.output[-4000:]
    if leftovers and "left running by the interrupted sweep" in last.output:  # (unless they ended on their own meanwhile)
        assert re.search(r"stopped \d+ process\(es\) left running by the interrupted sweep's local Ray: .*ray::", last.output)
    assert last.wait() == 0, last.output[-4000:]
    runs = trial_runs(client, "interrupted")
    assert len(runs) == 2 and len({r.data.tags[TRIAL_TAG] for r in runs}) == 2, [r.data.tags for r in runs]
    [parent] = client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert epoch_steps(client, run.info.run_id) == [1, 2]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == [
            "checkpoint/card.json", f"checkpoint/{RANKS_FILE}", f"checkpoint/{VISION_FILE}"]
    results = tune_results(tmp_path / "ray")
    for trial, done in finished.items():
        assert client.get_run(done.info.run_id).info.end_time == done.info.end_time  # not run (or recorded) again
        assert sorted((tmp_path / "ray").glob(f"*-train-{trial}/checkpoint_*")) == checkpoints[trial]
        # If Tune's saved state still had a finished trial running, the resumed sweep reported its stored
        # result again; it never restarted its workers (they would have resumed from its last checkpoint).
        # (Tune rewrites a restored trial's result.json, so it holds only what the resumed driver received.)
        assert all(r.get(RESUMED_FROM_KEY, 0) == 0 for r in results if r["trial_id"] == trial)


# ---------------------------------------------------------------------------------------------
# A NaN loss fails its trial with the reason; the sweep goes on; secrets never reach MLflow
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_sweep(ray_session, random_tiny_clip_weights, tmp_path_factory):
    """A grid over lr = 1e-4 and 1e30 (the second blows the loss up to NaN in its first epoch), run with
    secrets in the environment and one of them inside the weights file's path (so it reaches every record)."""
    tmp_path = tmp_path_factory.mktemp("nan-sweep")
    token, aws_key = f"tok{secrets.token_hex(12)}", f"aws{secrets.token_hex(16)}"
    weights = tmp_path / token / "weights.safetensors"
    weights.parent.mkdir()
    shutil.copy(random_tiny_clip_weights, weights)
    data = tiny_sweep(weights, "nan-trial", algorithm="grid", num_trials=None)
    data["space"] = {"lr": {"distribution": "choice", "values": [1e-4, 1e30]}}
    data["resources"].update(cpus_per_worker=0.5, max_concurrent_trials=2)  # both trials at once on the 2 test CPUs
    data["experiment"]["examples"] = 2  # the pictures' page and index are records too: no secret may reach them
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_TOKEN", token)
        env.setenv("AWS_SECRET_ACCESS_KEY", aws_key)
        summary = run_sweep(parse_sweep_spec(data, "nan.yaml"), tracking_uri=uri, storage_path=str(tmp_path / "ray"))
    return {"summary": summary, "uri": uri, "secrets": (token, aws_key), "tmp": tmp_path}


@pytest.mark.slow
def test_a_nan_loss_fails_its_trial_with_the_reason_and_the_sweep_goes_on(nan_sweep):
    summary, client = nan_sweep["summary"], MlflowClient(nan_sweep["uri"])
    assert sorted(r["status"] for r in summary["rows"]) == ["ERROR", "OK"]
    runs = {float(r.data.params["lr"]): r for r in trial_runs(client, "nan-trial")}
    assert set(runs) == {1e-4, 1e30}
    failed, fine = runs[1e30], runs[1e-4]
    assert failed.info.status == "FAILED"
    reason = failed.data.tags[FAILURE_TAG]
    assert re.search(r"the mava loss became nan at epoch 1, batch \d.*lower lr \(now 1e\+30\)", reason), reason
    assert epoch_steps(client, failed.info.run_id) == []  # no metric of a diverged epoch was recorded
    assert fine.info.status == "FINISHED" and epoch_steps(client, fine.info.run_id) == [1, 2]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mava.failed_trials"] == "1"
    # Deterministic failures are not retried: the diverged trial ran its first epoch once.
    nan_results = [r for r in tune_results(Path(summary["storage_path"])) if r.get("error/nonfinite_loss")]
    assert len(nan_results) == 1


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_params_tags_or_artifacts(nan_sweep):
    client, secret_values = MlflowClient(nan_sweep["uri"]), nan_sweep["secrets"]
    summary = nan_sweep["summary"]
    runs = [client.get_run(summary["parent_run_id"])] + trial_runs(client, "nan-trial")
    assert len(runs) == 3
    texts, artifacts = [], []
    for run in runs:
        texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()] + list(run.data.metrics)
        local = Path(client.download_artifacts(run.info.run_id, "", str(nan_sweep["tmp"] / "artifacts" / run.info.run_id)))
        artifacts += [p for p in local.rglob("*") if p.is_file() and p.parent.name != EXAMPLES_ARTIFACT_DIR]
        # The example pictures are pixels; their index and page are text and must not hold a secret either.
        texts += [p.read_text() for p in local.rglob(f"{EXAMPLES_ARTIFACT_DIR}/*") if p.suffix in (".json", ".html")]
    for version in client.search_model_versions("name = 'nan-trial-robust-vision'"):
        texts += [version.source, json.dumps(version.tags), version.description or ""]
    # The finished trial's checkpoint (the NaN trial has none) and the parent run's report: none may hold a secret.
    assert sorted(p.name for p in artifacts) == ["card.json", RANKS_FILE, "report.html", VISION_FILE]
    everything = "\n".join(texts + [p.read_bytes().decode("latin-1") for p in artifacts])
    for secret in secret_values:
        assert secret not in everything
    assert "<redacted>" in everything  # the path holding the token was recorded, with the token cut out


# ---------------------------------------------------------------------------------------------
# Nowhere to write, or no tracking server: one message, exit 2, before any compute
# ---------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("problem", ["artifacts-below-a-file", "tracking-server-down"])
def test_an_unusable_location_stops_the_sweep_before_any_compute(problem, random_tiny_clip_weights, tmp_path):
    data = tiny_sweep(random_tiny_clip_weights, "nowhere")
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("nothing can be created below a regular file, not even by root")
    data["storage"] = {"path": str(tmp_path / "ray")}
    if problem == "artifacts-below-a-file":
        data["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": str(blocker / "artifacts")}
        expected = rf"cannot write to {re.escape(str(blocker / 'artifacts'))} \(.+\): choose a writable tracking.artifact_location"
    else:
        data["tracking"] = {"uri": f"http://127.0.0.1:{_closed_port()}"}
        expected = r"MLflow tracking at http://127.0.0.1:\d+ is unreachable \(.*[Cc]onnection refused\): start the tracking server"
    sweep_file = tmp_path / "nowhere.yaml"
    sweep_file.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "platform.sweep", "--space", str(sweep_file)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(expected, result.stderr), result.stderr
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr + result.stdout
    # Nothing was started or recorded: no Ray, no sweep folder, no MLflow run; and no minutes of retries.
    assert "Ray" not in result.stdout + result.stderr
    assert not list((tmp_path / "ray").glob("nowhere-*"))
    if problem == "artifacts-below-a-file":
        assert not MlflowClient(data["tracking"]["uri"]).search_runs(
            [e.experiment_id for e in MlflowClient(data["tracking"]["uri"]).search_experiments()])
    assert elapsed < 120, elapsed


def test_the_dashboard_binds_to_loopback_unless_asked_otherwise():
    assert build_parser().parse_args(["--space", "x.yaml"]).dashboard_host == LOCAL_HOST == "127.0.0.1"
    assert build_parser().parse_args(["--space", "x.yaml", "--dashboard-host", "0.0.0.0"]).dashboard_host == "0.0.0.0"


# ---------------------------------------------------------------------------------------------
# Safe checkpoints: sha256 verified on load; nothing ever unpickled unrestrictedly
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def published_checkpoint(tmp_path) -> Path:
    """A robust checkpoint as a sweep publishes it: vision.safetensors and the card write_card makes."""
    clip = build_tiny_clip()
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, str(folder / VISION_FILE))
    params = {"model": "tiny-clip", "defense": "mava", "eps": 2 / 255}
    write_card(folder, params, {"pgd/eps2/tr1": 10.0}, folder / VISION_FILE)
    return folder


def test_a_published_checkpoint_loads_and_a_tampered_one_is_refused(published_checkpoint, random_tiny_clip):
    card = json.loads((published_checkpoint / "card.json").read_text())
    assert card["weights_file"] == VISION_FILE and re.fullmatch(r"[0-9a-f]{64}", card["sha256"])
    load_robust_vision(random_tiny_clip, published_checkpoint)  # the card vouches for the file

    weights = published_checkpoint / VISION_FILE
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 0x01  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(flipped))
    for load in (lambda: load_robust_vision(random_tiny_clip, published_checkpoint),
                 lambda: load_robust_vision(random_tiny_clip, weights),
                 lambda: read_state_dict(weights)):
        with pytest.raises(UserError, match=r"does not match the sha256 in .*card.json \(card [0-9a-f]{64}, file [0-9a-f]{64}\).*copy the checkpoint again"):
            load()
    weights.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(UserError, match="does not match the sha256"):
        load_robust_vision(random_tiny_clip, published_checkpoint)


def test_full_model_weights_with_a_card_are_verified_through_the_model_spec(tmp_path, random_tiny_clip_weights):
    weights = tmp_path / "clip.safetensors"
    shutil.copy(random_tiny_clip_weights, weights)
    (tmp_path / "card.json").write_text(json.dumps({"weights_file": weights.name, "sha256": "f" * 64}))
    with pytest.raises(UserError, match="does not match the sha256"):
        load_model(f"tiny-clip@{weights}")
    (tmp_path / "card.json").write_text(json.dumps({"weights_file": "another.safetensors", "sha256": "f" * 64}))
    load_model(f"tiny-clip@{weights}")  # a card about another file does not vouch for (or against) this one


class Payload:
    """Unpickling this runs code (it writes ``marker``): what a hostile weights file does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, random_tiny_clip_weights):
    marker = tmp_path / "code-ran"
    legacy = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": Payload(marker)}, legacy)
    raw = tmp_path / "evil.bin"
    raw.write_bytes(pickle.dumps({"visual.conv1.weight": Payload(marker)}))
    for path in (legacy, raw):
        with pytest.raises(UserError, match=r"could not be read safely with torch.load\(weights_only=True\)"):
            read_state_dict(path)
        with pytest.raises(UserError, match=r"could not be read safely"):
            load_model(f"tiny-clip@{path}")
        with pytest.raises(UserError, match=r"could not be read safely"):
            load_model(f"open_clip:ViT-B-16@{path}")
    assert not marker.exists()
    # The payload is live: an unrestricted load would have run it (so the checks above can fail).
    torch.load(legacy, weights_only=False)
    assert marker.read_text() == "code ran"


SOURCE_DIRS = ("platform", "trainables", "dashboards", "benchmarks")
UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads", "dill.load",
                "dill.loads", "joblib.load", "pandas.read_pickle", "pd.read_pickle", "yaml.load", "yaml.unsafe_load",
                "yaml.full_load", "marshal.loads", "shelve.open"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_code_path_unpickles_without_restriction():
    """torch.load always with weights_only=True; no pickle/dill/joblib/yaml.load; TorchScript only for OpenAI's release files."""
    offences, torch_loads = [], 0
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            where = path.relative_to(REPO_ROOT)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "cloudpickle", "dill", "joblib", "marshal"}:
                    if any(alias.name in {"load", "loads", "Unpickler"} for alias in node.names):
                        offences.append(f"{where}:{node.lineno}: from {node.module} import load")
                if not isinstance(node, ast.Call):
                    continue
                name = _dotted(node.func)
                if name in UNSAFE_CALLS:
                    offences.append(f"{where}:{node.lineno}: {name}(...)")
                if name == "torch.load":
                    torch_loads += 1
                    keywords = {k.arg: k.value for k in node.keywords}
                    safe = keywords.get("weights_only")
                    if not (isinstance(safe, ast.Constant) and safe.value is True):
                        offences.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
                if name in {"numpy.load", "np.load"}:
                    allow = {k.arg: k.value for k in node.keywords}.get("allow_pickle")
                    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                        offences.append(f"{where}:{node.lineno}: np.load with allow_pickle")
                if name == "torch.jit.load" and str(where) != "trainables/models/__init__.py":
                    offences.append(f"{where}:{node.lineno}: torch.jit.load outside the OpenAI release-file reader")
    assert not offences, offences
    assert torch_loads >= 1  # the scan does see the one legacy reader (trainables/models/weights.py)


# ---------------------------------------------------------------------------------------------
# The leftovers of a killed driver's local Ray: found by recorded pid or by Ray's session folder, nothing else
# ---------------------------------------------------------------------------------------------


def test_resume_stops_only_the_dead_drivers_leftovers_and_refuses_while_it_runs(tmp_path):
    from platform.leftovers import RECORD_FILE, stop_leftovers

    session = tmp_path / "session_2026-01-01_00-00-00_000000_1"
    (session / "logs").mkdir(parents=True)
    hold_open = "import sys, time; log = open(sys.argv[1], 'a'); time.sleep(600)"
    # Like Ray's renamed agents: nothing in its command line names the session, it only holds a log file of it open.
    agent = subprocess.Popen([sys.executable, "-c", hold_open, str(session / "logs" / "dashboard_agent.log")])
    recorded = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a recorded Ray pid
    bystander = subprocess.Popen([sys.executable, "-c", hold_open, str(tmp_path / "another-session.log")])
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        identity = lambda p: {"pid": p.pid, "create_time": psutil.Process(p.pid).create_time()}  # noqa: E731
        record = {"driver": identity(driver), "session_dir": str(session), "processes": [identity(recorded)]}
        (tmp_path / RECORD_FILE).write_text(json.dumps(record))
        wait_for(lambda: any(f.path.endswith("dashboard_agent.log") for f in psutil.Process(agent.pid).open_files()), "the agent's open log")
        with pytest.raises(UserError, match=rf"the sweep is still running: its driver \(pid {driver.pid}\) is alive"):
            stop_leftovers(tmp_path)
        assert agent.poll() is None and recorded.poll() is None  # a running sweep is never touched
        driver.kill()
        driver.wait()
        stopped = stop_leftovers(tmp_path)
        assert len(stopped) == 2 and agent.wait(timeout=30) is not None and recorded.wait(timeout=30) is not None
        assert bystander.poll() is None  # not of that Ray's session: left alone
        assert not (tmp_path / RECORD_FILE).exists() and stop_leftovers(tmp_path) == []
    finally:
        for process in (agent, recorded, bystander, driver):
            process.kill()
            process.wait()


def test_epochs_that_missed_mlflow_are_recorded_from_their_checkpoints(tmp_path):
    """A result for epoch 3 after epoch 1 (epoch 2 trained while the driver could not reach MLflow): epoch 2 comes
    from its checkpoint's state.json, so the run's history is 1, 2, 3, once each."""
    from types import SimpleNamespace

    from platform.tracking import MlflowTrialTracker, get_or_create_experiment, get_or_create_parent_run
    from trainables.config import TrainConfig

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ray"
    for epoch, name in ((1, "checkpoint_000000"), (2, "checkpoint_000001")):
        (storage / "s-train-t1" / name).mkdir(parents=True)
        (storage / "s-train-t1" / name / "state.json").write_text(json.dumps({"epoch": epoch, "metrics": {EPOCH: epoch, "train/loss": 10.0 * epoch}}))
    (storage / "s-train-t1" / "checkpoint_000002").mkdir()  # a marker checkpoint without state.json is skipped
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, "gaps", str(tmp_path / "artifacts"))
    tracker = MlflowTrialTracker(uri, experiment, get_or_create_parent_run(client, experiment, "s", {}, {}), "s")
    config = TrainConfig(epochs=3).model_dump(mode="json")
    trial = SimpleNamespace(trial_id="t1", config={"train": config, "sweep": {"searched": [], "workers_per_trial": 2, "storage_path": str(storage)}})
    tracker.on_trial_start(0, [], trial)
    for epoch in (1, 3, 3):  # the last: a replayed epoch, already recorded
        tracker.on_trial_result(0, [], trial, {EPOCH: epoch, "train/loss": 10.0 * epoch})
    tracker.flush()  # the tracker writes on its own thread
    [run] = trial_runs(client, "gaps")
    assert epoch_steps(client, run.info.run_id) == [1, 2, 3]
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)] == [(1, 10.0), (2, 20.0), (3, 30.0)]
    assert run.data.params[EFFECTIVE_BATCH_SIZE] == str(2 * config["batch_size"])


class _StalledServer:
    """A stand-in MLflow client whose every request waits until released (a tracking server that is down and
    comes back), or fails (one that never comes back, after MLflow's retries)."""

    def __init__(self, fail: bool = False):
        self.released, self.fail, self.calls = threading.Event(), fail, []

    def __getattr__(self, name):
        def request(*args, **kwargs):
            self.released.wait(timeout=60)
            self.calls.append(name)
            if self.fail:
                raise ConnectionError("tracking server unreachable")
            if name == "search_runs":
                return []
            if name == "create_run":
                return SimpleNamespace(info=SimpleNamespace(run_id="run-1"))
            return None

        return request


def _tracker_trial():
    from platform.tracking import MlflowTrialTracker
    from trainables.config import TrainConfig

    tracker = MlflowTrialTracker("http://127.0.0.1:1", "0", "parent", "s")
    trial = SimpleNamespace(trial_id="t1", config={"train": TrainConfig(epochs=2).model_dump(mode="json"),
                                                   "sweep": {"searched": [], "workers_per_trial": 1}})
    return tracker, trial


def test_tune_callbacks_never_wait_for_the_tracking_server():
    """A driver blocked in a callback stalls Ray Tune (a trial that ends while the driver does not poll never hands
    over its last result): the callbacks queue MLflow writes on one thread and return at once, in order."""
    tracker, trial = _tracker_trial()
    tracker._client = server = _StalledServer()
    started = time.perf_counter()
    tracker.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        tracker.on_trial_result(0, [], trial, {"epoch": epoch, "train/loss": 1.0 / epoch})
    tracker.on_trial_complete(0, [], trial)
    assert time.perf_counter() - started < 5 and server.calls == []  # nothing reached the stalled server yet
    server.released.set()
    tracker.flush()
    assert server.calls[:2] == ["search_runs", "create_run"] and server.calls.count("log_batch") == 3  # the params, epoch 1, epoch 2
    assert server.calls[-1] == "set_terminated"  # in callback order


def test_a_write_that_fails_after_mlflows_retries_stops_the_sweep_at_the_next_callback():
    tracker, trial = _tracker_trial()
    tracker._client = server = _StalledServer(fail=True)
    server.released.set()
    tracker.on_trial_start(0, [], trial)
    deadline = time.monotonic() + 30
    while not server.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    with pytest.raises(ConnectionError, match="unreachable"):
        tracker.on_trial_result(0, [], trial, {"epoch": 1, "train/loss": 1.0})
    tracker.flush()  # the failed write was raised once; nothing is left queued


def test_a_trial_that_ended_while_the_server_was_down_is_recorded_from_its_final_result(tmp_path):
    """Tune finished the trial while no write reached MLflow (its run holds epoch 1 only, still RUNNING): a resumed sweep
    never runs it again, so the end comes from what the trial left in storage: epochs 2-3 (from their checkpoints and
    the final result), the robust checkpoint and FINISHED. Replaying it again changes nothing."""
    from platform.tracking import MlflowTrialTracker, get_or_create_experiment, get_or_create_parent_run
    from trainables.config import TrainConfig
    from trainables.names import CHECKPOINT_PATH_KEY, DONE_FILE, STATE_FILE

    uri, storage = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "ray"
    folders = []
    for epoch in (1, 2, 3):
        folder = storage / "s-train-t1" / f"checkpoint_00000{epoch - 1}"
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch, "metrics": {EPOCH: epoch, "train/loss": 10.0 * epoch}}))
        folders.append(folder)
    save_file({"w": torch.zeros(2)}, str(folders[-1] / VISION_FILE))
    final = {EPOCH: 3, "train/loss": 30.0, "trial_id": "t1", CHECKPOINT_PATH_KEY: str(folders[-1])}
    (storage / "s-train-t1" / DONE_FILE).write_text(json.dumps(final))
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, "ends", str(tmp_path / "artifacts"))
    tracker = MlflowTrialTracker(uri, experiment, get_or_create_parent_run(client, experiment, "s", {}, {}), "s")
    config = {"train": TrainConfig(epochs=3).model_dump(mode="json"),
              "sweep": {"searched": [], "workers_per_trial": 1, "storage_path": str(storage), "sweep_id": "s"}}
    trial = SimpleNamespace(trial_id="t1", config=config)
    tracker.on_trial_start(0, [], trial)
    tracker.on_trial_result(0, [], trial, {EPOCH: 1, "train/loss": 10.0})
    tracker.flush()  # then the server went away: epochs 2, 3 and the end never reached MLflow
    unfinished = SimpleNamespace(metrics={"trial_id": "t2", EPOCH: 1}, config={**config, "sweep": {**config["sweep"]}}, error=None)
    results = [SimpleNamespace(metrics={**final, "done": False}, config=config, error=None), unfinished]
    for _ in range(2):
        replayed = MlflowTrialTracker(uri, experiment, tracker.parent_run_id, "s")  # the resumed driver's tracker
        replayed.record_missed_ends(results)
        replayed.flush()
        [run] = trial_runs(client, "ends")  # t2 left no final result: not ended, not created here
        assert run.info.status == "FINISHED"
        assert epoch_steps(client, run.info.run_id) == [1, 2, 3] and epoch_steps(client, run.info.run_id, "train/loss") == [1, 2, 3]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/card.json", "checkpoint/vision.safetensors"]


def test_a_driver_that_gave_up_on_the_server_exits_while_a_write_still_hangs():
    """A write stuck in a request to a dead server must not keep the driver alive after it has stopped
    (Python joins a ThreadPoolExecutor's threads at exit; the writer is a daemon thread)."""
    script = """
import sys, threading
from types import SimpleNamespace
from platform.tracking import MlflowTrialTracker
from trainables.config import TrainConfig

class Hung:
    def __getattr__(self, name):
        return lambda *a, **k: threading.Event().wait()  # a request that never gets an answer

tracker = MlflowTrialTracker("http://127.0.0.1:1", "0", "parent", "s")
tracker._client = Hung()
trial = SimpleNamespace(trial_id="t1", config={"train": TrainConfig().model_dump(mode="json"),
                                               "sweep": {"searched": [], "workers_per_trial": 1}})
tracker.on_trial_start(0, [], trial)
print("queued", flush=True)
sys.exit(2)
"""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "queued" in result.stdout, result.stderr[-2000:]
    assert time.monotonic() - started < 60
