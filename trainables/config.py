"""The training configuration: one frozen, validated object built once at the edge.

Everything the training loop needs is a field here (no ``cfg.get(..., default)``
below this point). Defaults are the paper's (Section 4.1, App. A.1) scaled to the
embedded default only in data size and epochs, never in the algorithm. Variants
from the authors' public code are named options; every result records them.
"""

from __future__ import annotations

from enum import Enum
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.defenses.mava import CmsForm
from trainables.errors import UserError


class Defense(str, Enum):
    MAVA = "mava"
    FARE = "fare"
    TECOA = "tecoa"


class OptimizerName(str, Enum):
    SGD = "sgd"  # momentum 0.9, as in the MAVA authors' code
    ADAMW = "adamw"  # as in FARE's training


class NeighbourMode(str, Enum):
    UNIFORM = "uniform"  # paper Eq. 2: v' + r_i, r_i ~ U[-beta*eps, beta*eps]^d (default)
    TRAJECTORY = "trajectory"  # authors' code: the last N iterates of the inner PGD


class EmbeddingSpace(str, Enum):
    RAW = "raw"  # distances on the encoder's raw outputs (paper's equations, FARE)
    NORMALIZED = "normalized"  # distances on L2-normalised embeddings (authors' code)


class Precision(str, Enum):
    """Arithmetic of the training step (issue 7). Evaluation always runs in fp32."""

    FP32 = "fp32"  # default: everything in float32
    # torch.autocast(bfloat16) around the attack and the outer forward passes (CUDA only); the
    # weights, their gradients, the optimiser state, the losses and the cached frozen features stay float32.
    BF16 = "bf16"


def parse_eps(value: object) -> float:
    """Accept ``2/255``, ``"2/255"``, ``0.00784`` -> float in pixel units; reject anything outside (0, 1]."""
    if isinstance(value, str):
        try:
            number = float(Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"eps {value!r} is not a number or a fraction such as 4/255") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"eps {value!r} is not a number or a fraction such as 4/255")
    if not 0.0 < number <= 1.0:
        raise ValueError(f"eps {value!r} = {number:g} is outside (0, 1]: eps is in [0, 1] pixel units, e.g. 4/255")
    return number


class TrainConfig(BaseModel):
    """One fine-tuning run (a sweep trial, or an in-process run in tests)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    model: str = "tiny-clip"  # model spec, see trainables.models
    defense: Defense = Defense.MAVA
    train_data: str = "synthetic:train,n=512"  # data spec, see trainables.data
    eval_data: str = "synthetic:test,n=100"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker
    lr: float = Field(1e-4, gt=0)  # paper: 1e-4 for CLIP, 1e-3 for ALBEF/TCL/BLIP
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: OptimizerName = OptimizerName.SGD
    momentum: float = Field(0.9, ge=0, lt=1)
    eps: float = 2 / 255  # training perturbation budget (pixel units)
    pgd_steps: int = Field(10, ge=1)
    pgd_step_size: float = Field(1 / 255, gt=0)
    # MAVA (Eq. 6 weights, neighbours, captions); ignored by FARE/TeCoA except M.
    a: float = Field(0.002, ge=0)
    b: float = Field(0.4, ge=0)
    c: float = Field(0.6, ge=0)
    N: int = Field(3, ge=1)  # neighbour samples
    M: int = Field(5, ge=1)  # captions per image
    beta: float = Field(1.5, gt=0)  # neighbour radius = beta * eps (authors pass 3/2)
    neighbours: NeighbourMode = NeighbourMode.UNIFORM
    embedding_space: EmbeddingSpace = EmbeddingSpace.RAW
    cms_form: CmsForm = CmsForm.ONE_MINUS_COS
    sca_half: bool = True  # paper Eq. 4's 0.5; the authors' code omits it
    inner_text_distance: bool = False  # authors' extra inner term ||F(x') - T||^2
    # Evaluation after each epoch (clean + PGD at each eval eps).
    eval_attacks: tuple[str, ...] = ("pgd",)
    eval_eps: tuple[float, ...] = (2 / 255, 4 / 255)
    eval_every: int = Field(1, ge=0)  # epochs between evaluations; 0 = only after the last epoch
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    # Speed options for CUDA GPUs (issue 7, numbers in BENCHMARKS.md). The step's mathematics is unchanged
    # except for bf16 rounding. Training refuses them when the device resolves to a CPU, where they did
    # not make the step faster (trainables.train.check_speed_options says why).
    precision: Precision = Precision.FP32
    compile: bool = False  # torch.compile the attack's and the outer step's encoder calls
    channels_last: bool = False  # NHWC memory format for the vision encoder's convolutions and its input images

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, value: object) -> float:
        return parse_eps(value)

    @field_validator("eval_eps", mode="before")
    @classmethod
    def _eval_eps(cls, value: object) -> tuple[float, ...]:
        values = value if isinstance(value, (list, tuple)) else [value]
        return tuple(parse_eps(v) for v in values)

    @field_validator("pgd_step_size", mode="before")
    @classmethod
    def _step(cls, value: object) -> float:
        return parse_eps(value)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.defense is Defense.MAVA and self.a == self.b == self.c == 0:
            raise ValueError("a, b and c are all 0: the MAVA loss would be zero; set at least one > 0")
        return self


def describe_validation_error(error: ValidationError, where: str) -> str:
    """One readable message per bad key: ``where: key 'x': problem (allowed: ...)``."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        value = problem.get("input")
        shown = "" if problem["type"] in {"extra_forbidden", "missing"} or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{where}: key '{key}': {message}{shown}")
    return "\n".join(lines)


def train_config_from(values: dict, where: str = "training options") -> TrainConfig:
    """Build a TrainConfig, turning validation errors into one UserError naming every bad key."""
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        allowed = ", ".join(TrainConfig.model_fields)
        raise UserError(f"{describe_validation_error(error, where)}\nvalid keys: {allowed}") from None
