"""Run a hyperparameter sweep: ``python -m platform.sweep --space search_spaces/abc.yaml``.

Ray Tune (Optuna TPE / NSGA-II or grid) samples the sweep file's space; each
trial runs the training loop in a Ray Train ``TorchTrainer`` (DDP over
``resources.workers_per_trial`` workers, CPU or GPU); every trial is an MLflow
child run of one parent run per sweep. ``--resume`` continues an interrupted
sweep: the same Tune experiment, the same MLflow runs. Under ``ray job submit``
(``RAY_ADDRESS`` set) the driver attaches to that cluster instead of starting one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import ray
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

from platform.cli import check_writable, parse_assignments, run_cli
from platform.leftovers import record_local_ray, state_folder, stop_leftovers
from platform.search import final_key, num_samples, planned_trials, scheduler, searcher, tune_space
from platform.sweep_spec import Choice, Fixed, IntRange, SweepSpec, load_sweep_spec
from platform.tracking import (ROLE_TAG, SWEEP_TAG, TRIAL_TAG, MlflowTrialTracker, find_run, get_or_create_experiment,
                               get_or_create_parent_run, register_best)
from platform.tracking_recovery import tracking_server_outage
from trainables.ray_worker import run_trial, training_options
from trainables.data import check_min_captions, load_dataset, parse_data_spec
from trainables.config import TrainConfig
from trainables.errors import UserError
from trainables.models import is_captioner_spec, load_model, parse_model_spec
from trainables.models.tiny_clip import ensure_pretrained

# The Tune trial only launches and watches its Train run; its workers hold the CPUs.
TRIAL_DRIVER_CPUS = 0.01
# Services this driver starts (Ray's dashboard) listen here unless --dashboard-host says otherwise.
LOCAL_HOST = "127.0.0.1"


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
    """Fail before any compute if results could not be written or the tracking server is unreachable."""
    local_dirs = []  # (what the user changes, the folder); the database first: its artifacts default to beside it
    if locations.tracking_uri.startswith("sqlite:///"):
        local_dirs.append(("--tracking-uri / tracking.uri (the SQLite file's folder)", str(Path(locations.tracking_uri.removeprefix("sqlite:///")).parent)))
    if locations.artifact_location and locations.artifact_location.startswith("file://"):
        local_dirs.append(("tracking.artifact_location", url2pathname(urlparse(locations.artifact_location).path)))
    if "://" not in locations.storage_path:
        local_dirs.append(("--storage-path / storage.path", locations.storage_path))
    for option, directory in local_dirs:
        check_writable(Path(directory), option)
    check_tracking_server(locations.tracking_uri)


# While checking the tracking server: one quick try instead of MLflow's default minutes of retries.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def check_tracking_server(uri: str) -> None:
    """One cheap request to the tracking store; a UserError (within seconds) when it does not answer."""
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
    need_cpus = r.workers_per_trial * r.cpus_per_worker + TRIAL_DRIVER_CPUS
    need_gpus = r.workers_per_trial * r.gpus_per_worker
    if need_gpus > gpus:
        raise UserError(f"resources: a trial needs {need_gpus:g} GPUs (workers_per_trial {r.workers_per_trial} x gpus_per_worker "
                        f"{r.gpus_per_worker:g}) but {where} has {gpus:g}: set resources.gpus_per_worker to 0 (CPU) or run on a GPU machine")
    if need_cpus > cpus:
        raise UserError(f"resources: a trial needs {need_cpus:g} CPUs (workers_per_trial {r.workers_per_trial} x cpus_per_worker "
                        f"{r.cpus_per_worker:g}) but {where} has {cpus:g}: lower resources.cpus_per_worker or workers_per_trial")


def check_inputs(spec: SweepSpec) -> None:
    """Model and data specs are valid, data loads, and every image has as many captions as the largest M searched.

    A captioner's training reads no captions (Eq. 8), so its training set is only loaded.
    """
    base = spec.base_training_options()
    parse_model_spec(base["model"])
    for key in ("train_data", "eval_data"):
        parse_data_spec(base[key])
    train_set = load_dataset(base["train_data"], image_size=32)
    if not is_captioner_spec(base["model"]):
        check_min_captions(train_set, largest_m(spec))
    if parse_data_spec(base["eval_data"]).kind != "synthetic":  # a real dataset: its files must be there too
        load_dataset(base["eval_data"], image_size=32)


def largest_m(spec: SweepSpec) -> int:
    """The most captions per image any trial can ask for."""
    searched = spec.space.get("M")
    if isinstance(searched, Choice):
        return int(max(searched.values))
    if isinstance(searched, IntRange):
        return searched.high
    if isinstance(searched, Fixed):
        return int(searched.value)
    return int(spec.base_training_options().get("M", TrainConfig.model_fields["M"].default))


def check_model_loads(spec: SweepSpec) -> None:
    """Load the model once in the driver: a corrupt, tampered or mismatched weights file fails here, not in every trial."""
    load_model(spec.experiment.model)


def resolve_sweep_id(spec: SweepSpec, storage_path: str, resume: str | bool) -> str:
    """A new sweep id, or the one to resume (the latest of this experiment, or the one named), checked to exist."""
    if not resume:
        return new_sweep_id(spec)
    if resume is True:
        return latest_sweep_id(spec, storage_path)
    path = Path(storage_path) / resume
    if not tune.Tuner.can_restore(str(path)):
        found = sorted(p.name for p in Path(storage_path).glob(f"{spec.experiment.name}-*[0-9]") if tune.Tuner.can_restore(str(p)))
        raise UserError(f"--resume {resume}: no sweep of that id under {storage_path} (resumable: {', '.join(found) or 'none'}): "
                        "pass one of those ids, or --resume alone for the latest")
    return resume


def new_sweep_id(spec: SweepSpec) -> str:
    return f"{spec.experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def latest_sweep_id(spec: SweepSpec, storage_path: str) -> str:
    candidates = sorted(Path(storage_path).glob(f"{spec.experiment.name}-*[0-9]"), key=lambda p: p.stat().st_mtime)
    candidates = [c for c in candidates if tune.Tuner.can_restore(str(c))]
    if not candidates:
        raise UserError(f"no sweep named {spec.experiment.name} to resume under {storage_path}: run without --resume to start one")
    return candidates[-1].name


def init_ray(dashboard_host: str = LOCAL_HOST) -> None:
    """Attach to the job's cluster, or start a local Ray whose dashboard listens on ``dashboard_host`` (loopback by default)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # `ray job submit`: attach to the cluster the job runs on
    else:
        # address="local": always a Ray of its own. Without it ray.init() joins any Ray it finds running on this
        # machine (another user's sweep, or the leftovers of a killed one).
        ray.init(address="local", dashboard_host=dashboard_host, include_dashboard=True, log_to_driver=True)


def build_tuner(spec: SweepSpec, sweep_id: str, locations: Locations, tracker: MlflowTrialTracker, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_DRIVER_CPUS})
    path = os.path.join(locations.storage_path, sweep_id)
    if resume:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    searched = sorted(spec.space)
    param_space = {
        **tune_space(spec),
        "train": {k: v for k, v in spec.base_training_options().items()},
        "sweep": {"sweep_id": sweep_id, "storage_path": locations.storage_path, "searched": searched,
                  "objectives": spec.objective_metrics(),
                  **spec.resources.model_dump(include={"workers_per_trial", "cpus_per_worker", "gpus_per_worker", "max_failures"})},
    }
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher(spec, study_name=sweep_id), scheduler=scheduler(spec),
                                    num_samples=num_samples(spec), max_concurrent_trials=spec.resources.max_concurrent_trials),
        run_config=tune.RunConfig(name=sweep_id, storage_path=locations.storage_path, callbacks=[tracker], verbose=1),
    )


def pareto_front(rows: list[dict], spec: SweepSpec) -> list[dict]:
    """Completed trials that no other trial beats on every objective."""
    signs = [1 if o.mode.value == "max" else -1 for o in spec.search.objectives]
    metrics = spec.objective_metrics()
    scored = [r for r in rows if all(r.get(m) is not None for m in metrics)]

    def dominates(x, y):
        a = [s * x[m] for s, m in zip(signs, metrics)]
        b = [s * y[m] for s, m in zip(signs, metrics)]
        return all(p >= q for p, q in zip(a, b)) and any(p > q for p, q in zip(a, b))

    return [r for r in scored if not any(dominates(o, r) for o in scored if o is not r)]


def trial_rows(results: tune.ResultGrid, spec: SweepSpec) -> list[dict]:
    rows = []
    for result in results:
        config = training_options(result.config) if result.config else {}
        metrics = result.metrics or {}
        row = {"trial": metrics.get("trial_id", "?"), "status": "ERROR" if result.error else "OK"}
        row.update({k: config.get(k) for k in sorted(spec.space)})
        row["epochs"] = metrics.get("epoch")
        for metric in spec.objective_metrics():
            row[metric] = metrics.get(final_key(metric))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_sweep(spec: SweepSpec, tracking_uri: str | None = None, storage_path: str | None = None, resume: str | bool = False,
              source: str = "", dashboard_host: str = LOCAL_HOST) -> dict:
    """Run (or resume) a sweep; returns a summary with the parent run id, trial rows and the Pareto front.

    Every check that can fail on the user's input runs first, cheapest first, before any
    MLflow run is created or Ray is started: locations, resources, specs and data, the
    sweep to resume, then the model (pretraining tiny-clip once if needed).
    """
    locations = resolve_locations(spec, tracking_uri, storage_path)
    check_locations(locations)
    check_resources(spec)
    check_inputs(spec)
    sweep_id = resolve_sweep_id(spec, locations.storage_path, resume)
    if resume:  # a killed driver's local Ray may have left processes behind: stop them (refused while it still runs)
        stop_leftovers(state_folder(locations.storage_path, sweep_id))
    if spec.experiment.model == "tiny-clip":
        ensure_pretrained()  # once, in the driver, before trials start (they would race to pretrain)
    check_model_loads(spec)
    client = MlflowClient(locations.tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment or spec.experiment.name, locations.artifact_location)
    parent_run_id = get_or_create_parent_run(client, experiment_id, sweep_id, {
        "sweep_file": source, "algorithm": spec.search.algorithm.value, "num_trials": planned_trials(spec),
        "objectives": json.dumps([o.model_dump(mode="json") for o in spec.search.objectives]),
        "space": json.dumps({k: v.model_dump(mode="json") for k, v in spec.space.items()}),
        **{f"fixed.{k}": v for k, v in spec.base_training_options().items()},
    }, tags={"mava.model": spec.experiment.model, "mava.defense": spec.experiment.defense})
    family = "clip" if "clip" in spec.experiment.model else spec.experiment.model.split(":")[0]
    tracker = MlflowTrialTracker(locations.tracking_uri, experiment_id, parent_run_id, sweep_id, family)
    init_ray(dashboard_host)
    record_local_ray(state_folder(locations.storage_path, sweep_id))
    started = time.perf_counter()
    with tracking_server_outage(locations.tracking_uri, sweep_id):  # a server gone for longer than MLflow's retries
        results = build_tuner(spec, sweep_id, locations, tracker, bool(resume)).fit()
    wall_seconds = time.perf_counter() - started
    rows = trial_rows(results, spec)
    front = pareto_front(rows, spec)
    summary = {"sweep_id": sweep_id, "parent_run_id": parent_run_id, "experiment_id": experiment_id, "rows": rows,
               "pareto_front": front, "wall_seconds": wall_seconds, "tracking_uri": locations.tracking_uri,
               "storage_path": os.path.join(locations.storage_path, sweep_id), "interrupted": False}
    ended = ended_trials(client, experiment_id, sweep_id)
    if ended < planned_trials(spec):
        # Ctrl-C or a stop: Tune saved its state; leave the parent RUNNING so --resume continues it.
        summary["interrupted"] = True
        return summary
    best = _best_trial_run(client, experiment_id, sweep_id, spec, front)
    if best is not None and spec.tracking.register_best:
        model_name = f"{spec.tracking.experiment or spec.experiment.name}-robust-vision"
        summary["registered"] = {"name": model_name, "version": register_best(client, best, model_name), "run_id": best}
        client.set_tag(parent_run_id, "mava.best_run_id", best)
    client.log_metric(parent_run_id, "sweep/wall_seconds", wall_seconds)
    failed = sum(1 for r in rows if r["status"] != "OK")
    client.set_tag(parent_run_id, "mava.failed_trials", str(failed))
    client.set_terminated(parent_run_id, status=RunStatus.to_string(RunStatus.FINISHED if failed < len(rows) else RunStatus.FAILED))
    return summary


def ended_trials(client: MlflowClient, experiment_id: str, sweep_id: str) -> int:
    """Trials of this sweep whose MLflow child run has ended (finished or failed)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{ROLE_TAG}` = 'trial'")
    return sum(1 for run in runs if run.info.status in ("FINISHED", "FAILED"))


def _best_trial_run(client: MlflowClient, experiment_id: str, sweep_id: str, spec: SweepSpec, front: list[dict]) -> str | None:
    """The MLflow run of the best finished trial by the first objective (among the Pareto front)."""
    if not front:
        return None
    objective = spec.search.objectives[0]
    best = (max if objective.mode.value == "max" else min)(front, key=lambda r: r[objective.metric])
    return find_run(client, experiment_id, {SWEEP_TAG: sweep_id, TRIAL_TAG: best["trial"]})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m platform.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="sweep file, e.g. search_spaces/abc.yaml")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="SWEEP_ID",
                        help="continue an interrupted sweep (the latest of this experiment, or SWEEP_ID)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the file's tracking.uri, else sqlite:///mlflow.db)")
    parser.add_argument("--storage-path", help="Ray results directory (default: the file's storage.path)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key of the sweep file, e.g. --set experiment.model=open_clip:ViT-B-16@/w/vit-b-16.pt")
    parser.add_argument("--summary-json", help="also write the summary (trial table, Pareto front, run ids) to this file")
    parser.add_argument("--dashboard-host", default=LOCAL_HOST,
                        help=f"address the local Ray dashboard listens on (default {LOCAL_HOST}: this machine only; 0.0.0.0 exposes it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = load_sweep_spec(args.space, parse_assignments(args.set, "--set"))
    if args.summary_json:
        check_writable(Path(args.summary_json).expanduser().resolve().parent, "--summary-json folder")
    summary = run_sweep(spec, args.tracking_uri, args.storage_path, args.resume, source=str(Path(args.space).resolve()),
                        dashboard_host=args.dashboard_host)
    if summary["interrupted"]:
        print(f"\nsweep {summary['sweep_id']} was interrupted; finished trials are kept in MLflow. Continue it with:\n"
              f"  python -m platform.sweep --space {args.space} --resume {summary['sweep_id']}")
        return 130
    print(f"\nsweep {summary['sweep_id']}: {len(summary['rows'])} trials in {summary['wall_seconds']:.0f} s")
    print(format_table(summary["rows"]))
    if len(spec.search.objectives) > 1:
        print("\nPareto front:")
        print(format_table(summary["pareto_front"]))
    if "registered" in summary:
        print(f"\nbest checkpoint registered as {summary['registered']['name']} v{summary['registered']['version']} (alias 'best')")
    print(f"MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}   (parent run {summary['parent_run_id']})")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if any(r["status"] == "OK" for r in summary["rows"]) else 1


if __name__ == "__main__":
    run_cli(main)
