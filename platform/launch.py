"""Starting a sweep's compute: its id (new, or the one to resume), Ray, and the Tune Tuner that runs the trials."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray
from ray import tune

from platform.preflight import TRIAL_DRIVER_RESOURCES, Locations
from platform.search import num_samples, scheduler, searcher, tune_space
from platform.specs import PinnedSpecs
from platform.sweep_spec import SweepSpec
from platform.tracking import MlflowTrialTracker
from trainables.errors import UserError
from trainables.names import PINNED_MODELS_KEY, PINNED_SPECS_KEY
from trainables.ray_worker import run_trial

# Services this driver starts (Ray's dashboard) listen here unless --dashboard-host says otherwise.
LOCAL_HOST = "127.0.0.1"
# A local Ray is one machine that no cluster manager drains: Ray Train's per-trial preemption watcher (one more
# actor process per trial, polling every 5 s) has nothing to watch. Ray Train's controller waits out its poll
# interval (2 s by default) before each poll of the workers and learns what they did (started, reported, finished)
# only at a poll; on one machine a poll is a local call, so it polls every 0.5 s (BENCHMARKS.md, "Sweep overhead
# met": 14.2 -> 11.8 s of overhead per trial). Set either in the environment to keep Ray's value.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


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
        for name, value in LOCAL_RAY_ENV.items():  # read by every Ray process this call starts (they inherit it)
            os.environ.setdefault(name, value)
        ray.init(address="local", dashboard_host=dashboard_host, include_dashboard=True, log_to_driver=True)


def build_tuner(spec: SweepSpec, sweep_id: str, locations: Locations, tracker: MlflowTrialTracker, resume: bool,
                pinned: PinnedSpecs) -> tune.Tuner:
    """The Tuner of a new sweep (searched keys at the top of each trial's config, fixed options under "train"), or the restored one."""
    trainable = tune.with_resources(run_trial, TRIAL_DRIVER_RESOURCES)
    path = os.path.join(locations.storage_path, sweep_id)
    if resume:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    searched = spec.searched_keys()  # the space's keys, and seed with search.seeds
    param_space = {
        **tune_space(spec),
        "train": spec.fixed_options(),
        "sweep": {"sweep_id": sweep_id, "storage_path": locations.storage_path, "searched": searched,
                  "objectives": spec.objective_metrics(),
                  PINNED_SPECS_KEY: pinned.worker_options(), PINNED_MODELS_KEY: pinned.pinned_models(),
                  **spec.resources.model_dump(include={"workers_per_trial", "cpus_per_worker", "gpus_per_worker", "max_failures"})},
    }
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher(spec, study_name=sweep_id), scheduler=scheduler(spec),
                                    num_samples=num_samples(spec), max_concurrent_trials=spec.resources.max_concurrent_trials,
                                    # Not reuse_actors: with it, the interrupted-then-killed resume test recorded one
                                    # trial twice (4 runs for 3 trials), and resume safety outranks seconds per trial.
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=sweep_id, storage_path=locations.storage_path, callbacks=[tracker], verbose=1),
    )
