"""Sweep spec -> Ray Tune search space, Optuna searcher and scheduler.

Optuna samples through Ray Tune's ``OptunaSearch`` (TPE, or NSGA-II for several
objectives), seeded so the same file and seed suggest the same first trials.
Objectives are read under ``final/<metric>`` keys that only the last epoch
reports: a trial stopped early by ASHA is then never told to Optuna as a
complete trial with partial values (REFERENCE-NOTES, Optuna pitfalls). ASHA runs
on the per-epoch metric with ``time_attr="epoch"``.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from platform.samplers import PicklableNSGAIISampler
from platform.sweep_spec import Algorithm, Choice, Fixed, IntRange, LogUniform, SweepSpec, Uniform

from trainables.names import EPOCH, final_metric


def final_key(metric: str) -> str:
    return final_metric(metric)


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    """Searched keys as Tune distributions (grid: ``grid_search`` over choices)."""
    space: dict[str, Any] = {}
    grid = spec.search.algorithm is Algorithm.GRID
    for key, d in spec.space.items():
        if isinstance(d, Uniform):
            space[key] = tune.uniform(d.low, d.high)
        elif isinstance(d, LogUniform):
            space[key] = tune.loguniform(d.low, d.high)
        elif isinstance(d, IntRange):
            space[key] = tune.randint(d.low, d.high + 1)  # Tune's upper bound is exclusive
        elif isinstance(d, Choice):
            space[key] = tune.grid_search(d.values) if grid else tune.choice(d.values)
        elif isinstance(d, Fixed):
            space[key] = d.value
    return space


def searcher(spec: SweepSpec, study_name: str):
    """The Optuna searcher (None for grid search, which Tune's variant generator runs)."""
    if spec.search.algorithm is Algorithm.GRID:
        return None
    metrics = [final_key(o.metric) for o in spec.search.objectives]
    modes = [o.mode.value for o in spec.search.objectives]
    if spec.search.algorithm is Algorithm.NSGA2:
        sampler = PicklableNSGAIISampler(seed=spec.search.seed, population_size=max(2, min(10, spec.search.num_trials // 2)))
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.search.seed)
    search = OptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=spec.search.initial_points or None,
        sampler=sampler,
        study_name=study_name,
    )
    return ConcurrencyLimiter(search, max_concurrent=spec.resources.max_concurrent_trials)


def scheduler(spec: SweepSpec):
    if spec.search.scheduler is None:
        return None
    objective = spec.search.objectives[0]
    return ASHAScheduler(time_attr=EPOCH, metric=objective.metric, mode=objective.mode.value,
                         max_t=spec.largest("epochs"), grace_period=spec.search.scheduler.grace_period,
                         reduction_factor=spec.search.scheduler.reduction_factor)


def num_samples(spec: SweepSpec) -> int:
    # With grid search, num_samples repeats the whole grid: one pass is what a grid means.
    return 1 if spec.search.algorithm is Algorithm.GRID else spec.search.num_trials


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the sweep runs in all (grid: every point of the grid once)."""
    return spec.grid_size() if spec.search.algorithm is Algorithm.GRID else spec.search.num_trials
