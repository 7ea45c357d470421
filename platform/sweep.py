"""Run a hyperparameter sweep: ``python -m platform.sweep --space search_spaces/abc.yaml``.

Ray Tune (Optuna TPE / NSGA-II or grid) samples the sweep file's space; each
trial runs the training loop under Ray Train (a ``TorchTrainer``: DDP over
``resources.workers_per_trial`` workers, CPU or GPU; one worker needs no process
group and runs in Ray Train's plain ``DataParallelTrainer``); every trial is an MLflow
child run of one parent run per sweep. ``--resume`` continues an interrupted
sweep: the same Tune experiment, the same MLflow runs. Under ``ray job submit``
(``RAY_ADDRESS`` set) the driver attaches to that cluster instead of starting one.
``--check`` runs every check a real run makes before compute and prints the
resolved plan, without starting Ray or writing to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from platform.cli import check_writable, parse_assignments, run_cli
from platform.launch import LOCAL_HOST, build_tuner, init_ray, resolve_sweep_id
from platform.leftovers import record_local_ray, state_folder, stop_leftovers
from platform.plan import describe_plan
from platform.preflight import check_model_loads, preflight
from platform.results import ended_trials, finish_sweep, format_table, pareto_front, trial_rows
from platform.search import planned_trials
from platform.specs import pin_specs
from platform.sweep_spec import SweepSpec, load_sweep_spec
from platform.tracking import MlflowTrialTracker, get_or_create_experiment, get_or_create_parent_run
from platform.tracking_recovery import tracking_server_outage
from trainables.models.embedded import EMBEDDED_WEIGHTS
from trainables.models.tiny_clip import cached_weights_path
from trainables.names import BASE_WEIGHTS_SHA256, DEFENSE_TAG, MODEL_TAG

__all__ = ["LOCAL_HOST", "build_parser", "check_sweep", "main", "pareto_front", "run_sweep"]


def parent_params(spec: SweepSpec, source: str) -> dict:
    """The parent run's params: the file, the search, and every training option the trials share."""
    return {
        "sweep_file": source, "algorithm": spec.search.algorithm.value, "num_trials": planned_trials(spec),
        "objectives": json.dumps([o.model_dump(mode="json") for o in spec.search.objectives]),
        "space": json.dumps({k: v.model_dump(mode="json") for k, v in spec.space.items()}),
        **({"seeds": json.dumps(spec.search.seeds)} if spec.search.seeds is not None else {}),
        **{f"fixed.{k}": v for k, v in spec.fixed_options().items() if k not in spec.searched_keys()},
    }


def run_sweep(spec: SweepSpec, tracking_uri: str | None = None, storage_path: str | None = None, resume: str | bool = False,
              source: str = "", dashboard_host: str = LOCAL_HOST) -> dict:
    """Run (or resume) a sweep; returns a summary with the parent run id, trial rows and the Pareto front.

    Every check that can fail on the user's input runs first (``platform.preflight``),
    before any MLflow run is created or Ray is started; then the sweep to resume, then
    the model (pretraining tiny-clip once if needed).
    """
    locations = preflight(spec, tracking_uri, storage_path)
    sweep_id = resolve_sweep_id(spec, locations.storage_path, resume)
    if resume:  # a killed driver's local Ray may have left processes behind: stop them (refused while it still runs)
        stop_leftovers(state_folder(locations.storage_path, sweep_id))
    # Once, in the driver: specs parsed to canonical form; an embedded model pretrained here if needed and pinned to
    # a content-addressed file under the storage folder, which every worker on every node loads (none pretrains).
    models = spec.candidate_values("model")  # one, or each value of a searched model
    pinned = pin_specs(spec.fixed_options(), locations.storage_path, searched=spec.space, models=models)
    for resolved in pinned.models.values():
        check_model_loads(resolved.spec)
    client = MlflowClient(locations.tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment or spec.experiment.name, locations.artifact_location)
    params = {**parent_params(spec, source), BASE_WEIGHTS_SHA256: pinned.base_weights_param()}
    parent_run_id = get_or_create_parent_run(client, experiment_id, sweep_id, params,
                                             tags={MODEL_TAG: ", ".join(models), DEFENSE_TAG: spec.experiment.defense.value})
    tracker = MlflowTrialTracker(locations.tracking_uri, experiment_id, parent_run_id, sweep_id)
    init_ray(dashboard_host)
    record_local_ray(state_folder(locations.storage_path, sweep_id))
    started = time.perf_counter()
    with tracking_server_outage(locations.tracking_uri, sweep_id):  # a server gone for longer than MLflow's retries
        try:
            results = build_tuner(spec, sweep_id, locations, tracker, bool(resume), pinned).fit()
            tracker.record_missed_ends(results)  # trials that ended while the server was down
        finally:
            tracker.flush()  # the writes still queued (a server that was down): before the summary reads MLflow
        wall_seconds = time.perf_counter() - started
        rows = trial_rows(results, spec)
        summary = {"sweep_id": sweep_id, "parent_run_id": parent_run_id, "experiment_id": experiment_id, "rows": rows,
                   "pareto_front": pareto_front(rows, spec), "wall_seconds": wall_seconds, "tracking_uri": locations.tracking_uri,
                   "storage_path": os.path.join(locations.storage_path, sweep_id), "interrupted": False}
        if ended_trials(client, experiment_id, sweep_id) < planned_trials(spec):
            # Ctrl-C or a stop: Tune saved its state; leave the parent RUNNING so --resume continues it.
            summary["interrupted"] = True
            return summary
        finish_sweep(client, spec, summary, wall_seconds)
    return summary


def check_sweep(spec: SweepSpec, tracking_uri: str | None = None, storage_path: str | None = None, resume: str | bool = False,
                source: str = "") -> str:
    """Every check ``run_sweep`` makes before compute, then the resolved plan; starts no Ray and writes nothing to MLflow."""
    locations = preflight(spec, tracking_uri, storage_path)
    sweep_id = resolve_sweep_id(spec, locations.storage_path, resume)
    model_note = "; ".join(model_plan(model) for model in spec.candidate_values("model"))
    return describe_plan(spec, source, locations, sweep_id, bool(resume), model_note)


def model_plan(model: str) -> str:
    """What a dry run says about one model of the sweep, after loading it when that is a check (a user's file) and not compute."""
    if model == "tiny-clip" and not cached_weights_path().is_file():
        # Pretraining is compute (minutes), not a check: say that the run will do it.
        return f"tiny-clip, not pretrained yet: the run pretrains it once into {cached_weights_path()} before the trials"
    if model in EMBEDDED_WEIGHTS and model != "tiny-clip":
        # The other embedded models (tiny-albef, tiny-tcl and their -ve and -vg fine-tunes) are built by the platform, no user file to
        # check; loading one may mean pretraining it, which is the run's compute, not a check's.
        return f"{model}, embedded: the run uses its cached weights, pretraining them first if this machine has none"
    check_model_loads(model)
    return f"{model} (loaded once: its weights are readable and match the architecture)"


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
    parser.add_argument("--check", action="store_true",
                        help="validate the file, the overrides, the specs, the paths and the tracking server, print the resolved "
                             "plan and exit (0: ready to run, 2: the problem); starts nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = load_sweep_spec(args.space, parse_assignments(args.set, "--set"))
    if args.summary_json:
        check_writable(Path(args.summary_json).expanduser().resolve().parent, "--summary-json folder")
    source = str(Path(args.space).resolve())
    if args.check:
        print(check_sweep(spec, args.tracking_uri, args.storage_path, args.resume, source=source))
        return 0
    summary = run_sweep(spec, args.tracking_uri, args.storage_path, args.resume, source=source, dashboard_host=args.dashboard_host)
    if summary["interrupted"]:
        print(f"\nsweep {summary['sweep_id']} was interrupted; finished trials are kept in MLflow. Continue it with:\n"
              f"  python -m platform.sweep --space {args.space} --resume {summary['sweep_id']}")
        return 130
    print(f"\nsweep {summary['sweep_id']}: {len(summary['rows'])} trials in {summary['wall_seconds']:.0f} s")
    print(format_table(summary["rows"]))
    if len(spec.search.objectives) > 1:
        print("\nPareto front:")
        print(format_table(summary["pareto_front"]))
    if summary.get("registered"):
        print()
    for registered in summary.get("registered", []):
        of = f" (best trial of {registered['model']})" if registered["model"] else ""
        print(f"best checkpoint{of} registered as {registered['name']} v{registered['version']} (alias 'best')")
    print(f"MLflow: mlflow ui --backend-store-uri {summary['tracking_uri']}   (parent run {summary['parent_run_id']})")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if any(r["status"] == "OK" for r in summary["rows"]) else 1


if __name__ == "__main__":
    run_cli(main)
