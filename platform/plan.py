"""The resolved plan of a sweep, as ``python -m platform.sweep --check`` prints it: what a run would do, in words."""

from __future__ import annotations

from typing import Any

from platform.preflight import Locations
from platform.search import planned_trials
from platform.sweep_checks import EPS_KEYS, yaml_line
from platform.sweep_spec import Algorithm, SweepSpec


def _distribution(key: str, d: Any) -> str:
    if d.distribution == "choice":
        in_255 = f"  ({', '.join(f'{v * 255:.4g}/255' for v in d.values)})" if key in EPS_KEYS else ""
        return f"~ choice {yaml_line(d.values)}{in_255}"
    if d.distribution == "fixed":
        return f"= {yaml_line(d.value)} (fixed in space:)"
    return f"~ {d.distribution} [{d.low:g}, {d.high:g}]" + (" (both ends included)" if d.distribution == "int" else "")


def _value(key: str, value: Any) -> str:
    """A fixed value as YAML, with eps-like values also in 1/255 units (how the paper writes them)."""
    text = yaml_line(value)
    if key in EPS_KEYS:
        return f"{text}  ({value * 255:.4g}/255)"
    if key == "eval_eps":
        return f"{text}  ({', '.join(f'{v * 255:.4g}/255' for v in value)})"
    return text


def describe_plan(spec: SweepSpec, source: str, locations: Locations, sweep_id: str, resume: bool, model_note: str) -> str:
    """Trials, search algorithm, objectives, resources, locations and every training option of the sweep."""
    search, r = spec.search, spec.resources
    per_seed = "" if search.seeds is None else f", once per seed {yaml_line(search.seeds)} (search.seeds)"
    if search.algorithm is Algorithm.GRID:
        trials = f"{planned_trials(spec)} (grid: every combination of the choices{per_seed or ' once'})"
    else:
        first = f"; the first {len(search.initial_points)} from search.initial_points" if search.initial_points else ""
        configurations = "" if search.seeds is None else (f"{search.num_trials} configurations{per_seed}, Optuna told each "
                                                          "configuration's mean over its seeds; ")
        trials = f"{planned_trials(spec)} ({configurations}{search.algorithm.value}, Optuna seed {search.seed}{first})"
    scheduler = "none (every trial runs all its epochs)"
    if search.scheduler is not None:
        scheduler = (f"ASHA on {search.objectives[0].metric} (grace_period {search.scheduler.grace_period}, "
                     f"reduction_factor {search.scheduler.reduction_factor:g}, max {spec.largest('epochs')} epochs)")
    registered = (f"; the best encoder{' of each model' if 'model' in spec.space else ''} is registered as "
                  f"{', '.join(spec.registered_model_names().values())}" if spec.tracking.register_best else "")
    lines = [
        f"sweep file: {source}: valid",
        f"sweep: resumes {sweep_id}" if resume else f"sweep: new (id {spec.experiment.name}-<start time>, e.g. {sweep_id})",
        f"trials: {trials}, at most {r.max_concurrent_trials} at a time",
        "objectives: " + ", ".join(f"{o.metric} ({o.mode.value})" for o in search.objectives),
        f"scheduler: {scheduler}",
        f"resources per trial: {r.workers_per_trial} worker(s) x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU), "
        f"up to {r.max_failures} worker restart(s) from the last checkpoint",
        f"tracking: {locations.tracking_uri}, experiment {spec.tracking.experiment or spec.experiment.name}{registered}",
        f"storage: {locations.storage_path}",
        f"model: {model_note}",
        "training config of every trial (experiment:; '~' marks a key searched in space:):",
    ]
    options = spec.fixed_options()
    width = max(map(len, options))
    for key, value in options.items():
        shown = _distribution(key, spec.space[key]) if key in spec.space else _value(key, value)
        if key == "seed" and search.seeds is not None:
            shown = f"~ {yaml_line(search.seeds)} (search.seeds: every point once per seed)"
        lines.append(f"  {key.ljust(width)}  {shown}")
    lines.append("checked only: Ray was not started and nothing was written to MLflow; run without --check to start the sweep")
    return "\n".join(lines)
