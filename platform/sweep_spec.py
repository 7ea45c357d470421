"""The sweep file (``search_spaces/*.yaml``), validated once into a typed, frozen object.

Sections: ``experiment`` (the training configuration of every trial: exactly
``trainables.config.TrainConfig``, its fields, defaults and checks, plus the
sweep's ``name``), ``resources`` (Ray Train workers per trial), ``search``
(algorithm, trials, objectives, scheduler, seed points), ``space``
(distributions over training options), ``tracking`` (MLflow) and ``storage``
(Ray results). A bad file gets one message per mistake naming the key, the bad
value and the fix, raised as a UserError (no traceback). The checks that span
sections (each ``space:`` entry against its field's type and range, objectives,
old and foreign spellings) are in ``platform/sweep_checks.py``.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from platform.sweep_checks import check_devices, check_objectives, check_space, normalize_eps_values, refuse_foreign_forms
from trainables.config import TrainConfig, describe_validation_error
from trainables.errors import UserError


class Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Experiment(TrainConfig):
    """The training configuration of every trial (trainables/config.py: the same fields, defaults and checks), plus a name.

    Searched keys (``space:``) replace their value here trial by trial.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")


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
    # Every point (grid point, or configuration Optuna samples) runs once per seed, its trial's param ``seed``
    # (the training seed: init order, attacks, evaluation); None: one trial per point at experiment.seed.
    seeds: list[StrictInt] | None = None

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and not seeds:
            raise ValueError("search.seeds is empty: list the training seeds every point runs with, e.g. [0, 1, 2], or remove the key")
        repeated = sorted({seed for seed in seeds or [] if seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"search.seeds repeats {', '.join(map(str, repeated))}: a repeated seed reruns the same trial; list each seed once")
        return seeds


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
        if self.search.seeds is not None and "seed" in self.space:
            raise ValueError("seed is both in space: and in search.seeds: keep search.seeds (every point once per seed) and remove space.seed")
        if self.search.seeds is not None and self.search.scheduler is not None and self.search.algorithm is not Algorithm.GRID:
            raise ValueError(f"search.seeds with search.scheduler: ASHA would stop some seeds of a point and not others, and "
                             f"{self.search.algorithm.value} is told their mean; remove one of them")
        return self

    def searched_keys(self) -> list[str]:
        """The options a trial's Tune config holds at its top level: the space's keys, and ``seed`` with search.seeds."""
        return sorted({*self.space, *(["seed"] if self.search.seeds is not None else [])})

    def fixed_options(self) -> dict[str, Any]:
        """Every TrainConfig field of the experiment as plain JSON values (what Tune passes to each trial)."""
        return self.experiment.model_dump(mode="json", exclude={"name"})

    def train_config(self, point: dict[str, Any] | None = None) -> TrainConfig:
        """The TrainConfig of a trial that samples ``point`` (e.g. an initial point); the fixed one without."""
        return TrainConfig(**{**self.fixed_options(), **(point or {})})

    def candidate_values(self, key: str) -> list[Any]:
        """The values of a training option that bound what any trial can take (a range's ends, every choice)."""
        searched = self.space.get(key)
        if searched is None:
            return [getattr(self.experiment, key)]
        if isinstance(searched, Choice):
            return list(searched.values)
        if isinstance(searched, Fixed):
            return [searched.value]
        return [searched.low, searched.high]

    def registered_model_names(self) -> dict[str | None, str]:
        """The registered model each model's best trial becomes a version of: ``<experiment>-robust-vision`` (key None) for
        a sweep of one model; with a searched ``model``, one name per model, since encoders of different models are not
        versions of one thing (``<experiment>-<model>-robust-vision``)."""
        base = self.tracking.experiment or self.experiment.name
        if "model" not in self.space:
            return {None: f"{base}-robust-vision"}
        names: dict[str | None, str] = {}
        for model in self.candidate_values("model"):
            name = f"{base}-{model_slug(model)}"
            while f"{name}-robust-vision" in names.values():  # two specs with the same short form (weights in other folders)
                name += "-2"
            names[model] = f"{name}-robust-vision"
        return names

    def largest(self, key: str) -> Any:
        """The largest value of a numeric option any trial can take (e.g. M, the captions a trial may ask for)."""
        return max(self.candidate_values(key))

    def objective_metrics(self) -> list[str]:
        return [objective.metric for objective in self.search.objectives]

    def grid_size(self) -> int:
        """Grid points times seeds: the trials a grid sweep runs."""
        return math.prod(len(d.values) for d in self.space.values() if isinstance(d, Choice)) * len(self.search.seeds or [0])


def model_slug(model: str) -> str:
    """A model spec as part of a registered model's name: ``albef:/m/text@/m/refcoco.pth -> albef-text-refcoco.pth``."""
    head, _, weights = model.partition("@")
    kind, _, name = head.partition(":")
    parts = (kind, name.rstrip("/").rsplit("/", 1)[-1], weights.rstrip("/").rsplit("/", 1)[-1])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(part for part in parts if part)).strip("-")


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
        refuse_foreign_forms(data)  # experiment.options, Ray/W&B ranges: say how to write them, not pydantic's words
        try:
            spec = SweepSpec(**normalize_eps_values(data))
        except ValidationError as error:
            raise UserError(describe_sweep_error(error, source)) from None
        check_space(spec)
        check_devices(spec)
        check_objectives(spec)
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
    if data is None:  # no document at all, or only comments
        raise UserError(f"sweep file {path} is empty: write its sections experiment:, search: and space: "
                        "(copy search_spaces/abc.yaml and change it)")
    return parse_sweep_spec(apply_overrides(data, overrides or {}), str(path))
