"""Hyperparameter importances from MLflow child runs, through Optuna's own evaluators.

Each sweep's finished trials become COMPLETE trials of an in-memory Optuna study
(``optuna.trial.create_trial`` + ``study.add_trial``) whose distributions come from
the parent run's ``space`` param, so Optuna sees the very space the sweep searched.
Where importances cannot mean anything (fewer than :data:`MIN_TRIALS` trials, a
constant objective, nothing searched) the result carries the reason instead, for
the page: a forest fitted to a handful of points ranks some param first whatever
the truth, and bars drawn from it look like a finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from dashboards.records import Sweep, Trial
from trainables.names import STATUS_FINISHED

EVALUATORS: dict[str, Callable[[], optuna.importance.BaseImportanceEvaluator]] = {
    # Seeded: the same records give the same page. fANOVA (default) needs scikit-learn, which MLflow installs.
    "fanova": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
    "mdi": lambda: optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0),
    "ped-anova": lambda: optuna.importance.PedAnovaImportanceEvaluator(),
}


# Below this many completed trials importances are noise (fANOVA fits a forest to them), so none are drawn.
MIN_TRIALS = 10


@dataclass(frozen=True)
class Importances:
    """Importances of one sweep's searched params for ``metric``; empty with a ``reason`` when not computable."""

    sweep_id: str
    metric: str
    values: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    trials: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. trials left out because a value lies outside the space


def distributions(space: dict[str, dict]) -> dict[str, BaseDistribution]:
    """The sweep file's distributions (as logged by platform.sweep) as Optuna distributions; fixed keys dropped."""
    result: dict[str, BaseDistribution] = {}
    for key, d in space.items():
        kind = d.get("distribution")
        if kind == "uniform":
            result[key] = FloatDistribution(float(d["low"]), float(d["high"]))
        elif kind == "loguniform":
            result[key] = FloatDistribution(float(d["low"]), float(d["high"]), log=True)
        elif kind == "int":
            result[key] = IntDistribution(int(d["low"]), int(d["high"]))
        elif kind == "choice":
            result[key] = CategoricalDistribution(list(d["values"]))
    return result


def param_value(raw: str, distribution: BaseDistribution) -> Any | None:
    """A logged param string as a value of ``distribution``; None when it is not one (outside the space)."""
    try:
        if isinstance(distribution, FloatDistribution):
            value: Any = float(raw)
            return value if distribution.low <= value <= distribution.high else None
        if isinstance(distribution, IntDistribution):
            value = int(float(raw))
            return value if distribution.low <= value <= distribution.high else None
    except ValueError:
        return None
    for choice in distribution.choices:  # params are logged as str(value): match the string, or the number
        if str(choice) == raw or (_is_number(choice) and _is_number(raw) and math.isclose(float(choice), float(raw), rel_tol=1e-9)):
            return choice
    return None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def sweep_importances(sweep: Sweep, trials: list[Trial], metric: str, mode: str = "max", evaluator: str = "fanova") -> Importances:
    """Optuna's importances of ``sweep``'s searched params for ``metric`` over its finished trials."""
    dists = distributions(sweep.space)
    searched = {k: d for k, d in dists.items() if not d.single()}
    if not searched:
        return Importances(sweep.sweep_id, metric, reason="the sweep searched no parameter (every key of its space is fixed)")
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize", study_name=sweep.sweep_id)
    notes, values = [], []
    for trial in trials:
        if trial.sweep_id != sweep.sweep_id or trial.status != STATUS_FINISHED or metric not in trial.metrics:
            continue
        params = {k: param_value(trial.params.get(k, ""), d) for k, d in searched.items()}
        outside = sorted(k for k, v in params.items() if v is None)
        if outside:
            notes.append(f"trial {trial.trial_id} left out: {', '.join(f'{k}={trial.params.get(k)}' for k in outside)} outside the space")
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=searched, value=trial.metrics[metric]))
        values.append(trial.metrics[metric])
    base = Importances(sweep.sweep_id, metric, trials=len(values), notes=notes)
    if len(values) < MIN_TRIALS:
        return _with(base, f"{len(values)} completed trial(s) with {metric}: importances from fewer than {MIN_TRIALS} "
                           "are noise (a forest fitted to a few points ranks some param first whatever the truth); "
                           "the scatter plots below show the trials themselves")
    if max(values) == min(values):
        return _with(base, f"{metric} is {values[0]:g} in every trial: a constant objective has no variance to attribute")
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=EVALUATORS[evaluator]())
    except RuntimeError as error:  # e.g. fANOVA's "zero total variance" when every trial drew the same values
        return _with(base, f"Optuna could not compute importances: {error}")
    return Importances(sweep.sweep_id, metric, {k: float(v) for k, v in importances.items()}, None, len(values), notes)


def _with(base: Importances, reason: str) -> Importances:
    return Importances(base.sweep_id, base.metric, {}, reason, base.trials, base.notes)
