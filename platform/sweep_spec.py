"""The sweep file (``search_spaces/*.yaml``), validated once into a typed, frozen object.

Sections: ``experiment`` (fixed training options), ``resources`` (Ray Train workers
per trial), ``search`` (algorithm, trials, objectives, scheduler, seed points),
``space`` (distributions over any training option), ``tracking`` (MLflow) and
``storage`` (Ray results). A bad file gets one message per mistake naming the
key, the bad value and what is allowed, raised as a UserError (no traceback).
Relative paths are resolved here, in the driver, because trials run elsewhere.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.attacks import ATTACKS
from trainables.config import TrainConfig, describe_validation_error, parse_eps, train_config_from
from trainables.errors import UserError
from trainables.models import model_kind
from trainables.tasks import task_info

SEARCHABLE = tuple(name for name in TrainConfig.model_fields if name not in {"model", "train_data", "eval_data", "eval_attacks", "eval_eps", "device", "epochs"})
EPS_KEYS = {"eps", "pgd_step_size"}


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Experiment(Strict):
    """Fixed training options of every trial (any TrainConfig field; see trainables/config.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = "tiny-clip"
    defense: str = "mava"
    train_data: str = "synthetic:train,n=512"
    eval_data: str = "synthetic:test,n=100"
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    pgd_steps: int = Field(10, ge=1)
    eval_attacks: list[str] = ["pgd"]
    eval_eps: list[float] = [2 / 255, 4 / 255]
    seed: int = 0
    options: dict[str, Any] = {}  # any other fixed TrainConfig option, e.g. {optimizer: adamw}

    @field_validator("eval_eps", mode="before")
    @classmethod
    def _eps(cls, value: object) -> list[float]:
        return [parse_eps(v) for v in (value if isinstance(value, list) else [value])]

    @field_validator("eval_attacks")
    @classmethod
    def _attacks(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack {', '.join(map(repr, unknown))}: use some of {', '.join(ATTACKS)}")
        return value


class Resources(Strict):
    workers_per_trial: int = Field(1, ge=1)  # Ray Train workers (DDP ranks) per trial
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)  # fractions allowed (e.g. 0.5: two workers share a GPU)
    max_concurrent_trials: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)  # Ray Train restarts of failed workers per trial, from the last checkpoint


class Algorithm(str, Enum):
    TPE = "tpe"
    NSGA2 = "nsga2"
    GRID = "grid"


class Mode(str, Enum):
    MAX = "max"
    MIN = "min"


class Objective(Strict):
    metric: str  # e.g. pgd/eps2/tr1 or clean/ir1
    mode: Mode = Mode.MAX


class Asha(Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs before a trial can be stopped
    reduction_factor: float = Field(2, gt=1)


class Search(Strict):
    algorithm: Algorithm = Algorithm.TPE
    num_trials: int | None = Field(None, ge=1)  # required for tpe/nsga2; grid runs every point once
    seed: int = 0
    objectives: list[Objective] = Field(min_length=1)
    scheduler: Asha | None = None
    initial_points: list[dict[str, Any]] = []  # evaluated first, e.g. the paper's {a: 0.002, b: 0.4, c: 0.6}


class Uniform(Strict):
    distribution: Literal["uniform"]
    low: float
    high: float


class LogUniform(Strict):
    distribution: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class IntRange(Strict):
    distribution: Literal["int"]
    low: int
    high: int  # inclusive


class Choice(Strict):
    distribution: Literal["choice"]
    values: list[Any] = Field(min_length=1)


class Fixed(Strict):
    distribution: Literal["fixed"]
    value: Any


Distribution = Annotated[Union[Uniform, LogUniform, IntRange, Choice, Fixed], Field(discriminator="distribution")]


class Tracking(Strict):
    uri: str | None = None  # default: sqlite:///<cwd>/mlflow.db (embedded); e.g. http://mlflow:5000
    experiment: str | None = None  # MLflow experiment; default: experiment.name
    artifact_location: str | None = None  # default: mlartifacts/ beside the SQLite database of the embedded store
    register_best: bool = True


class Storage(Strict):
    path: str = "ray_results"  # Ray Tune/Train storage; a shared path (NFS, s3://) on clusters


class SweepSpec(Strict):
    experiment: Experiment
    resources: Resources = Resources()
    search: Search
    space: dict[str, Distribution] = {}
    tracking: Tracking = Tracking()
    storage: Storage = Storage()

    @field_validator("space", mode="before")
    @classmethod
    def _scalars_are_fixed(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: (v if isinstance(v, dict) else {"distribution": "fixed", "value": v}) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        if self.search.algorithm is not Algorithm.GRID and self.search.num_trials is None:
            raise ValueError(f"search.num_trials is required for algorithm {self.search.algorithm.value}")
        if self.search.scheduler is not None and len(self.search.objectives) > 1:
            raise ValueError("search.scheduler (ASHA) needs a single objective: remove it or keep one objective")
        if self.search.algorithm is Algorithm.NSGA2 and len(self.search.objectives) < 2:
            raise ValueError("search.algorithm nsga2 is for several objectives: list at least two, or use tpe")
        return self

    def base_training_options(self) -> dict[str, Any]:
        """The fixed TrainConfig fields of every trial (before the searched ones are applied)."""
        e = self.experiment
        return {"model": e.model, "defense": e.defense, "train_data": e.train_data, "eval_data": e.eval_data,
                "epochs": e.epochs, "batch_size": e.batch_size, "pgd_steps": e.pgd_steps,
                "eval_attacks": tuple(e.eval_attacks), "eval_eps": tuple(e.eval_eps), "seed": e.seed, **e.options}

    def objective_metrics(self) -> list[str]:
        return [objective.metric for objective in self.search.objectives]

    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.space.values() if isinstance(d, Choice))


def _check_space(spec: SweepSpec) -> None:
    """Every searched key is a training option and every value it can take is valid for it."""
    base = spec.base_training_options()
    problems = []
    for key, distribution in spec.space.items():
        if key not in SEARCHABLE:
            problems.append(f"space: key '{key}' is not a searchable training option; searchable: {', '.join(SEARCHABLE)}")
            continue
        if isinstance(distribution, (Uniform, LogUniform, IntRange)) and not distribution.low < distribution.high:
            problems.append(f"space: key '{key}': low ({distribution.low}) must be below high ({distribution.high})")
            continue
        if isinstance(distribution, (Uniform, LogUniform)) and key in {"N", "M", "pgd_steps", "batch_size"}:
            problems.append(f"space: key '{key}' takes integers: use distribution int or choice")
            continue
        samples = {Uniform: lambda d: [d.low, d.high], LogUniform: lambda d: [d.low, d.high], IntRange: lambda d: [d.low, d.high],
                   Choice: lambda d: d.values, Fixed: lambda d: [d.value]}[type(distribution)](distribution)
        for sample in samples:
            try:
                TrainConfig(**{**base, key: sample})
            except ValidationError as error:
                reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
                problems.append(f"space: key '{key}' value {sample!r}: {reasons}")
    if spec.search.algorithm is Algorithm.GRID:
        for key, distribution in spec.space.items():
            if not isinstance(distribution, (Choice, Fixed)):
                problems.append(f"space: key '{key}': grid search needs choice or fixed values, got {distribution.distribution}")
    for index, point in enumerate(spec.search.initial_points):
        unknown = sorted(set(point) - set(spec.space))
        if unknown:
            problems.append(f"search.initial_points[{index}]: keys {unknown} are not in space (searched: {', '.join(spec.space) or 'none'})")
    if problems:
        raise UserError("\n".join(problems))


def _check_objectives(spec: SweepSpec) -> None:
    # The model kind's task says which metrics its per-epoch evaluation records (trainables.tasks).
    task = task_info(model_kind(spec.experiment.model).task)
    valid = task.objectives(tuple(spec.experiment.eval_attacks), tuple(spec.experiment.eval_eps))
    produced_by = task.produces
    for index, objective in enumerate(spec.search.objectives):
        if objective.metric not in valid:
            raise UserError(
                f"search.objectives[{index}].metric: {objective.metric!r} is not produced by this sweep's evaluation "
                f"({produced_by}); valid: {', '.join(valid)}"
            )


def _normalize_eps_values(data: dict) -> dict:
    # eps-like keys accept "2/255" in the space too; convert before the distribution models see them.
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


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model of the section at ``loc`` (e.g. ``("experiment",)`` -> Experiment), if it is one."""
    model: type[BaseModel] = SweepSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def describe_sweep_error(error: ValidationError, source: str) -> str:
    """One line per bad key (as describe_validation_error); an unknown key also lists the keys its section takes."""
    lines = describe_validation_error(error, source).splitlines()
    for index, problem in enumerate(error.errors()):
        if problem["type"] == "extra_forbidden" and index < len(lines):
            section = _section_model(tuple(problem["loc"][:-1]))
            if section is not None:
                lines[index] += f": remove it, or use one of {', '.join(section.model_fields)}"
    return "\n".join(lines)


FIX_HINT = "fix it in {source}, or override a key with --set SECTION.KEY=VALUE (README.md, 'The sweep file', lists every key)"


def parse_sweep_spec(data: object, source: str) -> SweepSpec:
    """Validate a parsed YAML document; every mistake becomes one line of a UserError, then how to fix it."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the sweep file must be a mapping with sections experiment, search, space, ... "
                        f"(got {type(data).__name__}): write it like search_spaces/abc.yaml")
    try:
        try:
            spec = SweepSpec(**_normalize_eps_values(data))
        except ValidationError as error:
            raise UserError(describe_sweep_error(error, source)) from None
        options = spec.base_training_options()
        train_config_from(options, f"{source}: experiment")  # e.g. an unknown defense or option name
        _check_space(spec)
        _check_objectives(spec)
    except UserError as error:
        raise UserError(f"{error}\n{FIX_HINT.format(source=source)}") from None
    return spec


def apply_overrides(data: dict, overrides: dict[str, str]) -> dict:
    """``{"experiment.model": "open_clip:ViT-B-16@/w.pt"}`` -> set that key in the document (values parsed as YAML)."""
    if not isinstance(data, dict):
        return data  # not a mapping: parse_sweep_spec says so
    for dotted, raw in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {dotted}: '{part}' is not a section of the sweep file")
        try:
            node[leaf] = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError as error:
            raise UserError(f"--set {dotted}={raw}: the value is not valid YAML ({getattr(error, 'problem', None) or error}): "
                            "quote it, e.g. --set 'experiment.model=\"...\"'") from None
    return data


def load_sweep_spec(path: str | Path, overrides: dict[str, str] | None = None) -> SweepSpec:
    """Read, override and validate a sweep file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"sweep file {path} is a folder: pass a YAML file, e.g. --space search_spaces/abc.yaml")
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist: pass --space search_spaces/abc.yaml or another file in search_spaces/")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}): pass the YAML sweep file, not a binary file") from None
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or error}): check its permissions") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where} ({problem}): fix the syntax there") from None
    return parse_sweep_spec(apply_overrides(data if data is not None else {}, overrides or {}), str(path))
