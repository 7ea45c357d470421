"""The sweep file's checks that span sections, and the spellings it refuses with a fix.

Each ``space:`` entry is checked against its own TrainConfig field: the field's
annotation decides which distributions fit (a float takes any; an integer takes
``int``, ``choice`` or ``fixed``, never ``uniform``/``loguniform``; enums, booleans
and names take ``choice`` or ``fixed``), and every value a trial can take (a
range's ends, every choice) is validated by TrainConfig itself, so bounds obey
the field's own constraints. ``platform/sweep_spec.py`` defines the sections.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from trainables.config import TrainConfig, parse_eps
from trainables.errors import UserError
from trainables.names import eps_fraction
from trainables.tasks import task_info

if TYPE_CHECKING:
    from platform.sweep_spec import SweepSpec

# Options every trial of one sweep shares, and why: the driver checks the data once before any trial
# starts, and the objectives are metrics that eval_attacks x eval_eps produce. (``model`` may be searched:
# the driver pins and checks every value of its choice; platform/specs.py.)
SWEEP_WIDE = {"train_data": "the driver checks it once", "eval_data": "the driver checks it once",
              "eval_attacks": "the objectives are its metrics", "eval_eps": "the objectives are its metrics"}
SEARCHABLE = tuple(name for name in TrainConfig.model_fields if name not in SWEEP_WIDE)
EPS_KEYS = {"eps", "pgd_step_size"}  # accept "2/255" in the space too
RANGES = ("uniform", "loguniform", "int")
# Other tools' names for this file's distributions (Ray Tune's functions, W&B's sweep keys).
RANGE_ALIASES = {"uniform": "uniform", "loguniform": "loguniform", "quniform": "uniform", "qloguniform": "loguniform",
                 "log_uniform_values": "loguniform", "randint": "int", "int": "int", "int_uniform": "int", "qrandint": "int"}
CHOICE_ALIASES = {"choice", "grid_search", "grid", "values", "categorical"}
NATIVE = {"uniform", "loguniform", "int", "choice", "fixed"}


def yaml_line(value: Any) -> str:
    """``value`` as one line of YAML, as the user would write it in the file."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip().removesuffix("...").strip()


def _native_form(value: dict) -> dict | None:
    """This file's spelling of a Ray Tune or W&B style range (``{uniform: [0.1, 1.0]}``), or None if it is not one."""
    if "distribution" not in value and len(value) == 1:
        (name, argument), = value.items()
        if name in RANGE_ALIASES and isinstance(argument, list) and len(argument) in (2, 3):
            low, high = argument[0], argument[1]
            if name in ("randint", "qrandint") and isinstance(high, int):
                high -= 1  # Ray's randint excludes its upper bound; this file's int includes it
            return {"distribution": RANGE_ALIASES[name], "low": low, "high": high}
        if name in CHOICE_ALIASES and isinstance(argument, list):
            return {"distribution": "choice", "values": argument}
        if name == "value":
            return {"distribution": "fixed", "value": argument}
    named = value.get("distribution")
    if {"min", "max"} & set(value) or (named is not None and named not in NATIVE and named in RANGE_ALIASES):
        low, high = value.get("min", value.get("low")), value.get("max", value.get("high"))
        kind = RANGE_ALIASES.get(named, "int" if isinstance(low, int) and isinstance(high, int) else "uniform")
        return {"distribution": kind, "low": low, "high": high}
    if named in CHOICE_ALIASES - {"choice"} and isinstance(value.get("values"), list):
        return {"distribution": "choice", "values": value["values"]}
    return None


def refuse_foreign_forms(data: dict) -> None:
    """The removed ``experiment.options`` section and other tools' range spellings, each with the line to write instead."""
    experiment = data.get("experiment")
    if isinstance(experiment, dict) and "options" in experiment:
        options = experiment["options"]
        keys = ", ".join(f"`{key}: {yaml_line(value)}`" for key, value in options.items()) if isinstance(options, dict) and options else ""
        raise UserError(f"experiment.options is gone: write {keys or 'each training option (e.g. `optimizer: adamw`)'} "
                        "directly under experiment: (every training option is a key of experiment: now)")
    space = data.get("space")
    problems = []
    for key, value in (space.items() if isinstance(space, dict) else []):
        native = _native_form(value) if isinstance(value, dict) else None
        if native is not None:
            problems.append(f"space: key '{key}': `{yaml_line(value)}` is Ray Tune / W&B style: write it as `{yaml_line(native)}`")
        elif isinstance(value, dict) and "distribution" not in value:
            problems.append(f"space: key '{key}' has no distribution: write it as `{{distribution: uniform, low: ..., high: ...}}` "
                            "(or int, loguniform, choice with values, fixed with value)")
        elif isinstance(value, list):
            problems.append(f"space: key '{key}': a bare list is ambiguous: write `{yaml_line({'distribution': 'choice', 'values': value})}` "
                            "for a choice, or `{distribution: uniform, low: ..., high: ...}` for a range")
    if problems:
        raise UserError("\n".join(problems))


def _takes(key: str) -> str:
    """What a field takes, in words, from its annotation (for messages)."""
    annotation = TrainConfig.model_fields[key].annotation
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(member.value for member in annotation)
    return {bool: "true or false", int: "integers", float: "numbers"}.get(annotation, "a name, not a number")


def _type_problem(key: str, distribution: Any) -> str | None:
    """Why ``distribution`` cannot sample the field ``key`` (decided by the field's annotation), or None."""
    annotation = TrainConfig.model_fields[key].annotation
    kind = distribution.distribution
    if kind in ("uniform", "loguniform") and annotation is int:
        return (f"space: key '{key}' takes integers, but {kind} draws fractions: write it as "
                f"`{{distribution: int, low: {math.ceil(distribution.low)}, high: {math.floor(distribution.high)}}}` or a choice of integers")
    if kind in RANGES and annotation not in (int, float):
        return f"space: key '{key}' takes {_takes(key)}, not a number range: write it as `{{distribution: choice, values: [...]}}`"
    return None


def check_space(spec: SweepSpec) -> None:
    """Every searched key is a per-trial training option, and every value it can take is valid for its field."""
    base = spec.fixed_options()
    problems = []
    for key, distribution in spec.space.items():
        if key in SWEEP_WIDE:
            problems.append(f"space: key '{key}' is the same for every trial of a sweep ({SWEEP_WIDE[key]}): set it under "
                            "experiment:, and run one sweep per value")
            continue
        if key not in SEARCHABLE:
            problems.append(f"space: key '{key}' is not a searchable training option; searchable: {', '.join(SEARCHABLE)}")
            continue
        if distribution.distribution in RANGES and not distribution.low < distribution.high:
            problems.append(f"space: key '{key}': low ({distribution.low}) must be below high ({distribution.high})")
            continue
        mismatch = _type_problem(key, distribution)
        if mismatch:
            problems.append(mismatch)
            continue
        for sample in spec.candidate_values(key):
            reasons = _invalid(base, {key: sample})
            if reasons:
                problems.append(f"space: key '{key}' value {sample!r}: {reasons}")
    if spec.search.algorithm.value == "grid":
        for key, distribution in spec.space.items():
            if distribution.distribution not in ("choice", "fixed"):
                problems.append(f"space: key '{key}': grid search needs choice or fixed values, got {distribution.distribution}")
    for index, point in enumerate(spec.search.initial_points):
        unknown = sorted(set(point) - set(spec.space))
        if unknown:
            problems.append(f"search.initial_points[{index}]: keys {unknown} are not in space (searched: {', '.join(spec.space) or 'none'})")
        elif reasons := _invalid(base, point):
            problems.append(f"search.initial_points[{index}]: {reasons}")
    if problems:
        raise UserError("\n".join(problems))


def _invalid(base: dict, values: dict) -> str:
    """Why TrainConfig refuses ``base`` with ``values`` applied ("" when it accepts it)."""
    try:
        TrainConfig(**{**base, **values})
    except ValidationError as error:
        return "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
    return ""


def check_devices(spec: SweepSpec) -> None:
    """A trial asked to run on CUDA gets a GPU from Ray: with gpus_per_worker 0 Ray hides every GPU from it."""
    if spec.resources.gpus_per_worker > 0:
        return
    where = "space: key 'device' value" if "device" in spec.space else "experiment.device"
    for device in spec.candidate_values("device"):
        if device.startswith("cuda"):
            raise UserError(f"{where} {device!r} runs each worker on a GPU, but resources.gpus_per_worker is 0: set device: auto "
                            "(or cpu), or give each worker a GPU with resources.gpus_per_worker: 1 on a machine that has one")


def check_objectives(spec: SweepSpec) -> None:
    """Every objective is a metric this sweep's evaluation reports."""
    # The run's task says which metrics its per-epoch evaluation records (trainables.tasks).
    tasks = {model: spec.train_config({"model": model}).run_task for model in spec.candidate_values("model")}
    if len(set(tasks.values())) > 1:
        raise UserError(f"space: key 'model': its models do different tasks ({', '.join(f'{m}: {t.value}' for m, t in tasks.items())}), "
                        "and one sweep's objectives are one task's metrics: search models of one task and run the others as another sweep")
    task = task_info(next(iter(tasks.values())))
    valid = task.objectives(tuple(spec.experiment.eval_attacks), tuple(spec.experiment.eval_eps))
    produced_by = task.produces
    for index, objective in enumerate(spec.search.objectives):
        if objective.metric not in valid:
            raise UserError(
                f"search.objectives[{index}].metric: {objective.metric!r} is not produced by this sweep's evaluation "
                f"({produced_by}; here eval_attacks [{', '.join(spec.experiment.eval_attacks)}], "
                f"eval_eps [{', '.join(eps_fraction(e) for e in spec.experiment.eval_eps)}]); valid: {', '.join(valid)}"
            )


def normalize_eps_values(data: dict) -> dict:
    """eps-like keys accept "2/255" in the space and initial points too: convert before the distribution models see them."""
    space = data.get("space")
    if isinstance(space, dict):
        for key in EPS_KEYS & set(space):
            value = space[key]
            try:
                if isinstance(value, dict) and value.get("distribution") == "choice" and isinstance(value.get("values"), list):
                    value["values"] = [parse_eps(v) for v in value["values"]]
                elif isinstance(value, dict) and value.get("distribution") in {"uniform", "loguniform"}:
                    value.update({b: parse_eps(value[b]) for b in ("low", "high") if b in value})
                elif isinstance(value, dict) and value.get("distribution") == "fixed":
                    value["value"] = parse_eps(value["value"])
                elif not isinstance(value, dict):
                    space[key] = parse_eps(value)
            except ValueError as error:
                raise UserError(f"space: key '{key}': {error}") from None
    search = data.get("search")
    if isinstance(search, dict) and isinstance(search.get("initial_points"), list):
        for index, point in enumerate(search["initial_points"]):
            for key in EPS_KEYS & set(point if isinstance(point, dict) else {}):
                try:
                    point[key] = parse_eps(point[key])
                except ValueError as error:
                    raise UserError(f"search.initial_points[{index}]: key '{key}': {error}") from None
    return data
