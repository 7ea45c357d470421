"""Everything a sweep checks before compute: where results go, the tracking server, resources, inputs, the model.

Each check raises a UserError naming the problem and the fix. ``preflight`` runs
them cheapest first and touches no MLflow store: the SQLite database is not
created here (its folder gets a write probe instead), so a sweep refused here,
or ``--check``, leaves no ``mlflow.db`` behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import ray
import torch
from mlflow.tracking import MlflowClient

from platform.cli import check_writable
from platform.sweep_spec import SweepSpec
from trainables.attacks.word_candidates import mlm_folder
from trainables.data import check_min_captions, load_dataset, parse_data_spec
from trainables.errors import UserError
from trainables.models import load_model, model_kind, parse_model_spec

# The Tune trial only launches and watches its Train run; its workers hold the CPUs. Its placement
# bundle holds no CPU, only a token of Ray's logical memory (a bundle must hold something): with a
# CPU share (it was 0.01), two one-CPU trials needed 2.02 CPUs on a 2-core machine, so the second
# trial's workers waited for the first trial to end and max_concurrent_trials: 2 ran one at a time.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}
# Tracking URIs whose store is a local file or folder: checked by a write probe, never opened before the run.
LOCAL_STORES = ("sqlite", "file", "")


@dataclass(frozen=True)
class Locations:
    """Every path and URI a sweep uses, absolute (trials run in other directories)."""

    tracking_uri: str
    artifact_location: str | None
    storage_path: str


def resolve_locations(spec: SweepSpec, tracking_uri: str | None, storage_path: str | None) -> Locations:
    uri = tracking_uri or spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    artifacts = spec.tracking.artifact_location
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()  # "sqlite:////abs/x.db" -> /abs/x.db
        uri = "sqlite:///" + str(database)
        # The embedded store keeps artifacts beside the database (MLflow's default, ./mlruns, would
        # follow whatever directory the driver happens to run in).
        artifacts = artifacts or str(database.parent / "mlartifacts")
    if artifacts and "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    storage = storage_path or spec.storage.path
    storage = storage if "://" in storage else str(Path(storage).resolve())
    return Locations(uri, artifacts, storage)


def check_locations(locations: Locations) -> None:
    """Fail before any compute if results could not be written (a probe file in each local folder)."""
    local_dirs = []  # (what the user changes, the folder); the database first: its artifacts default to beside it
    if locations.tracking_uri.startswith("sqlite:///"):
        local_dirs.append(("--tracking-uri / tracking.uri (the SQLite file's folder)", str(Path(locations.tracking_uri.removeprefix("sqlite:///")).parent)))
    if locations.artifact_location and locations.artifact_location.startswith("file://"):
        local_dirs.append(("tracking.artifact_location", url2pathname(urlparse(locations.artifact_location).path)))
    if "://" not in locations.storage_path:
        local_dirs.append(("--storage-path / storage.path", locations.storage_path))
    for option, directory in local_dirs:
        check_writable(Path(directory), option)


# While checking the tracking server: one quick try instead of MLflow's default minutes of retries.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def check_tracking_server(uri: str) -> None:
    """One cheap request to a remote tracking store; a UserError (within seconds) when it does not answer.

    A local store (SQLite file, folder) is left alone: opening it would create it, and
    check_locations has already proved its folder writable.
    """
    if urlparse(uri).scheme in LOCAL_STORES:
        return
    saved = {key: os.environ.get(key) for key in _PROBE_ENV}
    os.environ.update(_PROBE_ENV)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # any failure here means no tracking: say so before training starts
        raise UserError(f"MLflow tracking at {uri} is unreachable ({_short_reason(error)}): start the tracking server "
                        "(mlflow server ...) or fix --tracking-uri / tracking.uri") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _short_reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    errno = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if errno:
        return errno.group(1).strip()
    return text[:300] if text else type(error).__name__


def check_resources(spec: SweepSpec) -> None:
    """On a local run, one trial must fit this machine; otherwise Ray would wait for resources forever."""
    if os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        return  # a cluster: the autoscaler may add nodes, and Tune reports trials waiting for resources
    if ray.is_initialized():
        available = ray.cluster_resources()
        cpus, gpus, where = available.get("CPU", 0), available.get("GPU", 0), "the Ray cluster"
    else:
        cpus, gpus, where = os.cpu_count() or 1, torch.cuda.device_count(), "this machine"
    r = spec.resources
    need_cpus = r.workers_per_trial * r.cpus_per_worker
    need_gpus = r.workers_per_trial * r.gpus_per_worker
    if need_gpus > gpus:
        cuda = any(str(d).startswith("cuda") for d in spec.candidate_values("device"))
        raise UserError(f"resources: a trial needs {need_gpus:g} GPUs (workers_per_trial {r.workers_per_trial} x gpus_per_worker "
                        f"{r.gpus_per_worker:g}) but {where} has {gpus:g}: set resources.gpus_per_worker to 0 (CPU)"
                        f"{' and device: auto' if cuda else ''} or run on a GPU machine")
    if need_cpus > cpus:
        raise UserError(f"resources: a trial needs {need_cpus:g} CPUs (workers_per_trial {r.workers_per_trial} x cpus_per_worker "
                        f"{r.cpus_per_worker:g}) but {where} has {cpus:g}: lower resources.cpus_per_worker or workers_per_trial")


def check_specs(spec: SweepSpec) -> None:
    """The model and data specs parse and name files that exist (cheap: nothing is loaded)."""
    for model in spec.candidate_values("model"):
        parse_model_spec(model)
    for data in (spec.experiment.train_data, spec.experiment.eval_data):
        parse_data_spec(data)
    for source in spec.candidate_values("word_candidates"):
        folder = mlm_folder(source)
        if folder is not None and not folder.is_dir():
            raise UserError(f"word_candidates {source!r}: {folder} is not a folder: give a local folder holding a Hugging Face "
                            "masked LM and its tokenizer (e.g. bert-base-uncased saved with save_pretrained), or offline")


def check_inputs(spec: SweepSpec) -> None:
    """Model and data specs are valid, data loads, and every image has as many captions as the largest M searched.

    A captioner's training reads no captions (Eq. 8), so its training set is only loaded.
    """
    check_specs(spec)
    train_set = load_dataset(spec.experiment.train_data, image_size=32)
    if any(model_kind(model).model_class.has_text_encoder for model in spec.candidate_values("model")):
        check_min_captions(train_set, int(spec.largest("M")))
    if parse_data_spec(spec.experiment.eval_data).kind != "synthetic":  # a real dataset: its files must be there too
        load_dataset(spec.experiment.eval_data, image_size=32)


def check_model_loads(model_spec: str) -> None:
    """Load the model once in the driver: a corrupt, tampered or mismatched weights file fails here, not in every trial."""
    load_model(model_spec)


def preflight(spec: SweepSpec, tracking_uri: str | None, storage_path: str | None) -> Locations:
    """Every check on the user's input that needs no model, cheapest first; the locations the sweep will use."""
    check_specs(spec)  # an unknown model kind or a missing file, before any folder is created
    locations = resolve_locations(spec, tracking_uri, storage_path)
    check_locations(locations)
    check_resources(spec)
    check_tracking_server(locations.tracking_uri)
    check_inputs(spec)
    return locations
