"""MLflow records of a sweep: one parent run, one child run per trial, owned by the driver.

Only the driver talks to MLflow (never a Ray worker, never every rank): a Ray Tune
``Callback`` receives every trial's per-epoch results and logs them to that trial's
child run. Runs are found again by tags (sweep id + trial id), so a resumed sweep
or a retried worker continues the same runs instead of duplicating them, and an
epoch that was already logged is never logged twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from platform.mlflow_downloads import quiet_downloads
from platform.mlflow_ui import describe_sweep
from platform.tracking_recovery import checkpointed_epochs
from trainables.config import TrainConfig
from trainables.models import model_kind
from trainables.names import (BASE_WEIGHTS_SHA256, CARD_FILE, CHECKPOINT_ARTIFACT_DIR, CHECKPOINT_PATH_KEY, DEFENSE_TAG,
                              ENDED_STATUSES, EPOCH, EPS_TAG, FAILURE_TAG, FINAL_PREFIX, MODEL_FAMILY_TAG, MODEL_TAG, SCORING_TAG,
                              PARENT_RUN_TAG, REGISTERED_AS_TAG, ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL, STATE_FILE, STATUS_RUNNING,
                              SWEEP_TAG, TASK_TAG, TRIAL_TAG, VISION_FILE, EFFECTIVE_BATCH_SIZE, EXAMPLES_ARTIFACT_DIR, RANKS_FILE,
                              eps_fraction)
from trainables.errors import UserError
from trainables.evaluation.rerank import scoring_label
from trainables.ray_worker import finished_result, pinned_sha256, training_options
from trainables.tasks import Task, task_info

__all__ = ["CARD_FILE", "CHECKPOINT_ARTIFACT_DIR", "ENDED_STATUSES", "FAILURE_TAG", "ROLE_TAG", "SWEEP_TAG", "TRIAL_TAG",
           "MlflowTrialTracker", "find_run", "get_or_create_experiment", "get_or_create_parent_run", "register_best"]
# Environment variables whose values must never reach params, tags or artifacts.
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")
REDACTED = "<redacted>"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def secret_values() -> list[str]:
    """Values of environment variables that look like secrets (names with TOKEN, SECRET, KEY, ...), 8+ characters."""
    values = {v for k, v in os.environ.items() if any(m in k.upper() for m in SECRET_MARKERS) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)  # longest first, so a secret containing another is replaced whole


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret environment variable's value replaced by ``<redacted>``."""
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact(values: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``values`` (dicts, lists, strings, nested) with secret values replaced by ``<redacted>``.

    Everything the platform writes to MLflow (params, tags, the card) goes through this:
    tracking tokens and cloud keys live in the environment of the driver and must never
    reach a record that every user of the tracking server can read.
    """
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return values
    if isinstance(values, str):
        return redact_text(values, secrets)
    if isinstance(values, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(redact(v, secrets) for v in values)
    return values


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=2)
    return runs[0].info.run_id if runs else None


def get_or_create_parent_run(client: MlflowClient, experiment_id: str, sweep_id: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    run_id = find_run(client, experiment_id, {SWEEP_TAG: sweep_id, ROLE_TAG: ROLE_SWEEP})
    if run_id is not None:
        client.update_run(run_id, status=STATUS_RUNNING)
        return run_id
    run = client.create_run(experiment_id, run_name=redact_text(sweep_id), tags=redact({SWEEP_TAG: sweep_id, ROLE_TAG: ROLE_SWEEP, **tags}))
    log_params(client, run.info.run_id, params)
    describe_sweep(client, experiment_id, run.info.run_id, sweep_id, redact(params))  # what the MLflow UI shows
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params as strings, secrets redacted (after str(), so nested values are covered too)."""
    client.log_batch(run_id, params=[Param(k, redact_text(str(v))[:6000]) for k, v in sorted(params.items())])


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Our metrics only (names with a '/'), numeric and finite; Tune's bookkeeping fields are dropped."""
    return {k: float(v) for k, v in result.items()
            if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def write_card(directory: Path, trial_params: dict[str, Any], metrics: dict[str, float], vision_path: Path) -> Path:
    """The small JSON card published beside the robust encoder weights; its threat model is the task's."""
    card = redact({
        "base_model": trial_params["model"],
        BASE_WEIGHTS_SHA256: trial_params.get(BASE_WEIGHTS_SHA256),
        "defense": trial_params["defense"],
        "eps": trial_params["eps"],
        "eps_255": round(float(trial_params["eps"]) * 255, 3),
        "hyperparameters": trial_params,
        "metrics": metrics,
        "weights_file": VISION_FILE,
        "sha256": sha256_of(vision_path),
        "threat_model": task_info(run_task(trial_params)).threat_model,
    })
    path = directory / CARD_FILE
    path.write_text(json.dumps(card, indent=2, default=str))
    return path


def failure_reason(trial) -> str:
    """The reason a trial failed: the last exception line of its Ray error file (e.g. ``TrialFailed: the mava loss became nan ...``)."""
    error_file = getattr(trial, "error_file", None)
    text = Path(error_file).read_text(errors="replace") if error_file and Path(error_file).is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray writes "Failure # N (occurred at ...)" then the remote traceback; the exception line is the last "Name: message".
    for line in reversed(lines):
        name, sep, message = line.partition(": ")
        if sep and name.replace(".", "").replace("_", "").isalnum() and name[:1].isupper():
            return f"{name.rsplit('.', 1)[-1]}: {message}"
    return lines[-1] if lines else f"trial failed; see error.txt under the Ray trial directory {getattr(trial, 'path', '')}"


def trial_params(trial) -> dict[str, Any]:
    """Every training option of a trial, defaults included, and the sha256 of the base weights its workers loaded.

    What its child run records as params. ``model`` is the spec as the user wrote it; the
    sha256 says which bytes it was (``trainables.models.embedded`` pinned them at the edge).
    """
    params = TrainConfig(**training_options(trial.config)).model_dump(mode="json")
    sha256 = pinned_sha256(trial.config)
    return {**params, BASE_WEIGHTS_SHA256: sha256} if sha256 else params


def run_task(params: dict[str, Any]) -> Task:
    """The task of a trial from its recorded params: ``task``, or (None or absent: the default) its model kind's main task."""
    return Task(params["task"]) if params.get("task") else model_kind(params["model"]).task


def trial_tags(params: dict[str, Any]) -> dict[str, str]:
    """The tags that group a trial: model spec, the model kind's family and task, defense, eps, base weights."""
    kind = model_kind(params["model"])
    tags = {MODEL_TAG: params["model"], MODEL_FAMILY_TAG: kind.family, TASK_TAG: run_task(params).value,
            DEFENSE_TAG: params["defense"], EPS_TAG: eps_fraction(float(params["eps"]))}
    if run_task(params) is Task.RETRIEVAL:  # the model class's rule, the same label every result row of the trial carries
        tags[SCORING_TAG] = scoring_label(kind.model_class, int(params.get("k_test", TrainConfig.model_fields["k_test"].default)))
    if params.get(BASE_WEIGHTS_SHA256):
        tags[BASE_WEIGHTS_SHA256] = params[BASE_WEIGHTS_SHA256]
    return tags


class _Writer:
    """One daemon thread that runs queued calls in order, each answered through a ``Future``.

    Not ``ThreadPoolExecutor``: Python joins its threads at exit, so a driver that gave up on a dead
    server would then hang in a request to it; a daemon thread ends with the driver, and what it had
    not written is rebuilt by ``--resume`` (from MLflow and the trials' storage).
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="mlflow-writer", daemon=True).start()

    def submit(self, call, *args) -> Future:
        future: Future = Future()
        self._queue.put((future, call, args))
        return future

    def stop(self) -> None:
        self._queue.put(None)

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call, args = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled: the writer gave up on the server
            try:
                future.set_result(call(*args))
            except BaseException as error:  # handed to the driver's thread, which raises it
                future.set_exception(error)


@dataclass(frozen=True)
class TrialInfo:
    """What the writer thread needs of a Tune trial, read in Tune's thread (the trial object changes as Tune runs)."""

    trial_id: str
    params: dict[str, Any]
    workers: int
    storage_path: str | None

    @classmethod
    def of(cls, trial) -> "TrialInfo":
        sweep = trial.config["sweep"]
        return cls(trial.trial_id, trial_params(trial), sweep["workers_per_trial"], sweep.get("storage_path"))


class MlflowTrialTracker(Callback):
    """Ray Tune callback: child run per trial, per-epoch metrics, robust checkpoint + card at the end.

    Every MLflow write runs on one writer thread, in callback order, so that Tune's event loop
    never waits for the tracking server. While a server is down, MLflow retries each request
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``) on that thread and Tune goes on polling its trials: a
    driver blocked in a callback for minutes stalls Ray Tune (a trial function that ends while
    the driver does not poll never hands over its last result). A write that still fails after
    MLflow's retries is raised in Tune's thread at the next callback, or by :meth:`flush`, which the
    sweep calls after ``fit()`` so that nothing queued is lost.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep_id: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_id = sweep_id
        self._client: MlflowClient | None = None
        self._writer: _Writer | None = None
        self._pending: list[Future] = []
        self._runs: dict[str, str] = {}
        self._last_epoch: dict[str, int] = {}
        self._last_checkpoint: dict[str, str] = {}
        self._ended: set[str] = set()  # trials whose MLflow run has its final status

    @property
    def client(self) -> MlflowClient:
        if self._client is None:  # created lazily: the callback object is pickled with the experiment state
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict:
        # Tune pickles this callback with the experiment; a restored copy must re-read MLflow
        # (the source of truth) instead of trusting per-trial caches from before the interruption.
        state = dict(self.__dict__)
        state.update(_client=None, _writer=None, _pending=[], _runs={}, _last_epoch={}, _last_checkpoint={},
                     _ended=set())
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_ended", set())
        state.setdefault("_writer", None)
        state.setdefault("_pending", [])
        self.__dict__.update(state)

    # ---- the writer thread ------------------------------------------------------------------------

    def _submit(self, write, *args) -> None:
        """Queue an MLflow write behind the earlier ones; first raise any earlier write that failed."""
        self._raise_failed()
        if self._writer is None:
            self._writer = _Writer()
        self._pending.append(self._writer.submit(write, *args))

    def _raise_failed(self) -> None:
        for future in self._pending:
            if future.done() and future.exception() is not None:
                self._stop_writer()
                raise future.exception()
        self._pending = [future for future in self._pending if not future.done()]

    def _stop_writer(self) -> None:
        # The server is gone for longer than MLflow's retries: queued writes would fail the same way, and --resume
        # rebuilds what they held from MLflow and the trials' checkpoints.
        for future in self._pending:
            future.cancel()
        if self._writer is not None:
            self._writer.stop()
        self._writer, self._pending = None, []

    def flush(self) -> None:
        """Wait for every queued write; raise the first one that failed (after MLflow's own retries)."""
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                future.result()
        except BaseException:
            self._stop_writer()
            raise

    def record_missed_ends(self, results) -> None:
        """Record the ends that MLflow missed, from what the trials left in storage (after ``fit()``, then :meth:`flush`).

        A trial that ended while the tracking server was down is finished in Tune's state, so a
        resumed sweep never runs it again and no callback would record its last epochs, its
        checkpoint or its status. Each trial that left its final result (``DONE_FILE``) is
        replayed here, and each errored trial's error; the writes skip what a run already holds,
        so this is a no-op for runs whose end is recorded.
        """
        for result in results:
            trial_id = (result.metrics or {}).get("trial_id")
            if trial_id is None or not result.config:
                continue  # never reported: no run to complete
            trial = TrialInfo.of(SimpleNamespace(trial_id=trial_id, config=result.config))
            if result.error is not None:
                self._submit(self._record_error, trial, redact_text(f"{type(result.error).__name__}: {result.error}")[-4000:])
                continue
            final = finished_result(result.config, trial_id)
            if final is not None:  # ended; an interrupted trial has none and is run again by --resume
                self._submit(self._record_result, trial, final)
                self._submit(self._record_complete, trial)

    # ---- Tune's callbacks (Tune's thread: read the trial, queue the write) --------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._submit(self._run_for, TrialInfo.of(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._submit(self._record_result, TrialInfo.of(trial), dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._submit(self._record_complete, TrialInfo.of(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._submit(self._record_error, TrialInfo.of(trial), redact_text(failure_reason(trial))[-4000:])

    # ---- the writes (writer thread only) -------------------------------------------------------------

    def _run_for(self, trial: TrialInfo) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        tags = {SWEEP_TAG: self.sweep_id, TRIAL_TAG: trial.trial_id}
        run_id = find_run(self.client, self.experiment_id, tags)
        if run_id is None:
            train = trial.params
            run = self.client.create_run(self.experiment_id, run_name=redact_text(f"{self.sweep_id}/{trial.trial_id}"), tags=redact({
                **tags, ROLE_TAG: ROLE_TRIAL, PARENT_RUN_TAG: self.parent_run_id, **trial_tags(train)}))
            run_id = run.info.run_id
            log_params(self.client, run_id, {**train, EFFECTIVE_BATCH_SIZE: train["batch_size"] * trial.workers})
            self._last_epoch[trial.trial_id] = 0
        else:
            # Resumed sweep or restarted trial: continue after the last epoch this run already holds.
            history = self.client.get_metric_history(run_id, EPOCH)
            self._last_epoch[trial.trial_id] = int(max((m.value for m in history), default=0))
            if self.client.get_run(run_id).info.status in ENDED_STATUSES:
                # Its end (checkpoint, card, status) is recorded: a re-run after a crash changes nothing.
                self._ended.add(trial.trial_id)
            else:
                self.client.update_run(run_id, status=STATUS_RUNNING)
        self._runs[trial.trial_id] = run_id
        return run_id

    def _record_result(self, trial: TrialInfo, result: dict[str, Any]) -> None:
        run_id = self._run_for(trial)
        if CHECKPOINT_PATH_KEY in result:
            self._last_checkpoint[trial.trial_id] = result[CHECKPOINT_PATH_KEY]
        metrics = numeric_metrics(result)
        epoch = int(result.get(EPOCH, 0))
        if not metrics or epoch <= self._last_epoch.get(trial.trial_id, 0) or trial.trial_id in self._ended:
            return  # an epoch that is already recorded (a restarted worker replays its checkpoint's epoch)
        now = int(time.time() * 1000)
        epochs = {epoch: metrics}
        if epoch > self._last_epoch.get(trial.trial_id, 0) + 1:
            # Epochs between reached Ray's storage but not MLflow (the driver was waiting for, or lost, the server): from their checkpoints.
            stored = checkpointed_epochs(trial.storage_path, f"{self.sweep_id}-train-{trial.trial_id}")
            epochs |= {e: numeric_metrics(stored[e]) for e in range(self._last_epoch.get(trial.trial_id, 0) + 1, epoch) if e in stored}
        batch = [Metric(k, v, now, e) for e, values in sorted(epochs.items()) for k, v in values.items() if not k.startswith(FINAL_PREFIX)]
        self.client.log_batch(run_id, metrics=batch + [Metric(EPOCH, e, now, e) for e in sorted(epochs)])
        self._last_epoch[trial.trial_id] = epoch

    def _record_complete(self, trial: TrialInfo) -> None:
        run_id = self._run_for(trial)
        if trial.trial_id in self._ended:
            return
        checkpoint = self._last_checkpoint.get(trial.trial_id)
        if checkpoint and (Path(checkpoint) / VISION_FILE).is_file():
            self.log_checkpoint(run_id, trial.params, Path(checkpoint))
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED))
        self._ended.add(trial.trial_id)

    def _record_error(self, trial: TrialInfo, reason: str) -> None:
        run_id = self._run_for(trial)
        if trial.trial_id in self._ended:
            return
        self.client.set_tag(run_id, FAILURE_TAG, reason)
        self.client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED))
        self._ended.add(trial.trial_id)

    def log_checkpoint(self, run_id: str, trial_params: dict[str, Any], checkpoint: Path) -> None:
        """Upload the robust encoder, its card and the final ranks under ``checkpoint/``; example pictures under ``examples/``."""
        state = json.loads((checkpoint / STATE_FILE).read_text())
        with tempfile.TemporaryDirectory() as staging:
            staging_dir = Path(staging)
            shutil.copy2(checkpoint / VISION_FILE, staging_dir / VISION_FILE)
            if (checkpoint / RANKS_FILE).is_file():  # what platform.compare bootstraps over test images
                shutil.copy2(checkpoint / RANKS_FILE, staging_dir / RANKS_FILE)
            write_card(staging_dir, trial_params, numeric_metrics(state["metrics"]), staging_dir / VISION_FILE)
            self.client.log_artifacts(run_id, str(staging_dir), CHECKPOINT_ARTIFACT_DIR)
        if (checkpoint / EXAMPLES_ARTIFACT_DIR).is_dir():  # adversarial-example pictures of the last epoch
            self.client.log_artifacts(run_id, str(checkpoint / EXAMPLES_ARTIFACT_DIR), EXAMPLES_ARTIFACT_DIR)


def register_best(client: MlflowClient, run_id: str, model_name: str) -> str:
    """Register a trial's robust encoder as an MLflow pyfunc model, a new version of ``model_name`` with alias ``best``."""
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model_name)
    from platform.registry import log_pyfunc_model  # imports platform.export, which imports this module

    try:
        with quiet_downloads():  # the pyfunc is built from the run's checkpoint, downloaded first
            source = log_pyfunc_model(client, run_id)  # an MLflow pyfunc that embeds images (platform/pyfunc_model.py)
    except UserError as error:
        # The base model cannot be rebuilt from what the run recorded (e.g. a secret in its weights path was
        # redacted from the params): register the checkpoint folder (safetensors + card) instead, and say why.
        client.set_tag(run_id, REGISTERED_AS_TAG, redact_text(f"checkpoint folder, not a pyfunc model: {error}")[:4000])
        source = f"{client.get_run(run_id).info.artifact_uri}/{CHECKPOINT_ARTIFACT_DIR}"
    version = client.create_model_version(model_name, source=source, run_id=run_id)
    client.set_registered_model_alias(model_name, "best", version.version)
    return version.version
