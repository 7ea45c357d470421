"""Sweep spec -> Ray Tune search space, Optuna searcher and scheduler.

Optuna samples through Ray Tune's ``OptunaSearch`` (TPE, or NSGA-II for several
objectives), seeded so the same file and seed suggest the same first trials.
Objectives are read under ``final/<metric>`` keys that only the last epoch
reports: a trial stopped early by ASHA is then never told to Optuna as a
complete trial with partial values (REFERENCE-NOTES, Optuna pitfalls). ASHA runs
on the per-epoch metric with ``time_attr="epoch"``.

Seeds (``search.seeds``) replicate points. A grid adds ``seed`` as one more
``grid_search`` axis. With tpe/nsga2, Ray Tune's ``Repeater`` runs each
configuration Optuna suggests once per seed (:class:`SeedRepeater`, which sets the
trial's ``seed``): Optuna sees one trial per configuration, told the mean over its
seeds of each objective (NaN seeds, e.g. failed ones, left out of the mean), so it
models the configuration, not one seed's luck; ``num_trials`` counts configurations.
"""

from __future__ import annotations

from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
import numpy as np
from ray.tune.search import ConcurrencyLimiter, Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

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
    if grid and spec.search.seeds is not None:
        space["seed"] = tune.grid_search(spec.search.seeds)  # with tpe/nsga2, SeedRepeater sets it
    return space


class SeedRepeater(Repeater):
    """Ray Tune's ``Repeater`` that gives the i-th repeat of a configuration the i-th of ``seeds`` as its ``seed``.

    Repeater averages a single metric; with several objectives (nsga2) each is averaged
    over the seeds on its own before the inner searcher (Optuna) is told.
    """

    def __init__(self, searcher, seeds: list[int]):
        super().__init__(searcher, repeat=len(seeds), set_index=True)
        self.seeds = list(seeds)

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config["seed"] = self.seeds[config.pop(TRIAL_INDEX)]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, **kwargs) -> None:
        metrics = self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
        group = self._trial_id_to_group[trial_id]
        group.report(trial_id, [float((result or {}).get(m, np.nan)) for m in metrics])
        if group.finished_reporting():
            with np.errstate(all="ignore"):
                means = np.nanmean(np.array(group.scores(), dtype=float), axis=0)
            self.searcher.on_trial_complete(group.primary_trial_id, result=dict(zip(metrics, means.tolist())), **kwargs)


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
    if spec.search.seeds is not None:
        search = SeedRepeater(search, spec.search.seeds)
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
    # Repeater counts every repeat as a sample: configurations times seeds.
    return 1 if spec.search.algorithm is Algorithm.GRID else planned_trials(spec)


def planned_trials(spec: SweepSpec) -> int:
    """How many trials the sweep runs in all (grid: every point of the grid once; each point once per seed)."""
    if spec.search.algorithm is Algorithm.GRID:
        return spec.grid_size()
    return spec.search.num_trials * len(spec.search.seeds or [0])
