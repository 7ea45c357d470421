"""The training configuration: one frozen, validated object built once at the edge.

Everything the training loop needs is a field here (no ``cfg.get(..., default)``
below this point). Defaults are the paper's (Section 4.1, App. A.1) scaled to the
embedded default only in data size and epochs, never in the algorithm. Variants
from the authors' public code are named options; every result records them.
"""

from __future__ import annotations

import re
from enum import Enum
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.attacks import ATTACKS
from trainables.attacks.word_candidates import check_word_candidates, embedded_mlm_problem
from trainables.defenses.mava import CmsForm
from trainables.errors import UserError
from trainables.models import is_captioner_spec, model_kind
from trainables.tasks import Task


class Defense(str, Enum):
    MAVA = "mava"
    FARE = "fare"
    TECOA = "tecoa"


class OptimizerName(str, Enum):
    SGD = "sgd"  # momentum 0.9, as in the MAVA authors' code
    ADAMW = "adamw"  # as in FARE's training


class NeighbourMode(str, Enum):
    """The views of the adversarial image that L_VSSE and L_CMS are computed on (issue 14, defect 3)."""

    UNIFORM = "uniform"  # paper Eq. 2: N views v' + r_i, r_i ~ U[-beta*eps, beta*eps]^d (default)
    LAST_ITERATES = "last_iterates"  # the last N iterates of the plain inner PGD as N views (not the authors' code)
    # The authors' code (pgd_2, trainables.attacks.pgd2): look-ahead momentum PGD from the clean image, the pixel
    # mean of its last N+1 iterates as ONE view, F(x_avg).
    AUTHORS_PGD2 = "authors_pgd2"


class AblatedTerm(str, Enum):
    """A MAVA strategy removed for the paper's Table 4 (``w/X``: X removed); see trainables.steps.mava_weights."""

    NONE = "none"  # full MAVA
    CMS = "cms"  # no cross-modal supervision: a = 0, and L_CMS leaves the inner objective (Eq. 5 = L_VSSE)
    VSSE = "vsse"  # no semantic-space expansion: N = 0, L_VSSE at the adversarial point alone (FARE's term), weight b kept
    SCA = "sca"  # no semantic consistency alignment: c = 0


# Neighbour modes that were renamed, with why: a YAML that still names one is refused with the new names.
RETIRED_NEIGHBOUR_MODES = {
    "trajectory": "it took the last N plain-PGD iterates as N views, which is not what the authors' pgd_2 does: "
                  "write neighbours: last_iterates for that reading, or neighbours: authors_pgd2 for the authors' code "
                  "(the pixel mean of the last N+1 look-ahead momentum iterates, one view, no random start)",
}


class InnerNeighbourhood(str, Enum):
    """Where the inner PGD evaluates Eq. 5's objective at each step."""

    ZERO = "zero"  # r = 0: the current iterate alone, as the authors' code does (default: one forward per step)
    NEIGHBOURS = "neighbours"  # Eq. 5 as written: over N neighbours x' + r_i, r_i ~ U[-beta*eps, beta*eps], redrawn each step


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
    # What the run is fine-tuned and evaluated for; None = the model kind's main task (its first in MODEL_KINDS).
    # A fusion model (ALBEF, TCL) does several: retrieval, and entailment or grounding where its checkpoint has the head.
    task: Task | None = None
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
    # MAVA (Eq. 6 weights, neighbours, captions); ignored by FARE/TeCoA except M. A captioner (no text
    # encoder, e.g. hf-blip-cap) trains with Eq. 8, b*L_VSSE + c*L_SCA: it needs a = 0 and uses no M.
    a: float = Field(0.002, ge=0)
    b: float = Field(0.4, ge=0)
    c: float = Field(0.6, ge=0)
    N: int = Field(3, ge=0)  # neighbour samples; 0 = the adversarial point alone (r = 0), the paper's Figure 3 N = 0
    M: int = Field(5, ge=1)  # captions per image
    beta: float = Field(1.5, gt=0)  # neighbour radius = beta * eps (authors pass 3/2)
    neighbours: NeighbourMode = NeighbourMode.UNIFORM
    ablate: AblatedTerm = AblatedTerm.NONE  # Table 4's ablations of MAVA (``w/CMS``, ``w/VSSE``, ``w/SCA``)
    inner_neighbourhood: InnerNeighbourhood = InnerNeighbourhood.ZERO  # Eq. 5 at r = 0 (code) or over N neighbours (paper)
    # MAVA's inner PGD starts at a uniform point of the eps-ball; the authors' code has no random start (false;
    # neighbours: authors_pgd2 needs false).
    mava_random_start: bool = True
    embedding_space: EmbeddingSpace = EmbeddingSpace.RAW
    # FARE's inner PGD: RobustVLM's 0.9 momentum on the signs (v = sign(0.9 v + sign g), as FARE's code; default), or
    # plain sign steps (false). They differ only where a pixel's gradient is exactly 0 (then v keeps its direction).
    fare_sign_momentum: bool = True
    cms_form: CmsForm = CmsForm.ONE_MINUS_COS
    sca_half: bool = True  # paper Eq. 4's 0.5; the authors' code omits it
    inner_text_distance: bool = False  # authors' extra inner term ||F(x') - T||^2
    # Evaluation after each epoch (clean + PGD at each eval eps): retrieval recall; for a captioner,
    # clean caption metrics (BLEU, METEOR, ROUGE-L, CIDEr), so eval_attacks must be empty there.
    eval_attacks: tuple[str, ...] = ("pgd",)
    eval_eps: tuple[float, ...] = (2 / 255, 4 / 255)
    # Word source of the text attacks in eval_attacks (sga, co-attack, vlp-attack; recorded in every
    # row's text_source): tiny-mlm (embedded MLM), mlm:/abs/folder (e.g. bert-base-uncased) or offline
    # (character edits + token-embedding neighbours); see trainables.attacks.word_candidates.
    word_candidates: str = "tiny-mlm"
    eval_every: int = Field(1, ge=0)  # epochs between evaluations; 0 = only after the last epoch
    # A model with an ITM head (model.itm_scoring: BLIP, ALBEF, TCL) is evaluated by re-scoring each image's and
    # each caption's top-k_test ITC candidates with it (papers: 128 on Flickr30k, 256 on COCO); others by cosine.
    k_test: int = Field(128, ge=1)
    # After the last epoch, this many test images are attacked with each eval attack (largest eval eps) on the undefended
    # and the fine-tuned encoder, and saved as pictures with their top captions (the trial's ``examples/``
    # artifact, and the report's adversarial-example section); 0 = none. Retrieval models only.
    examples: int = Field(3, ge=0)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu; or cpu, cuda, cuda:N
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

    @field_validator("neighbours", mode="before")
    @classmethod
    def _retired_neighbours(cls, value: object) -> object:
        if isinstance(value, str) and value in RETIRED_NEIGHBOUR_MODES:
            raise ValueError(f"{value!r} was renamed: {RETIRED_NEIGHBOUR_MODES[value]}")
        return value

    @field_validator("eval_attacks", mode="before")
    @classmethod
    def _eval_attacks(cls, value: object) -> object:
        # A command line's ``--set eval_attacks=pgd,sga`` (or ``=`` for none) arrives as one string.
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("eval_attacks")
    @classmethod
    def _known_attacks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in ATTACKS]
        if unknown:
            raise ValueError(f"unknown attack {', '.join(map(repr, unknown))}: use some of {', '.join(ATTACKS)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        # Only the devices the loop can run (torch.device names it resolves); "gpu" or "mps" would fail in a worker.
        if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
            raise ValueError(f"unknown device {value!r}: use auto (a GPU when there is one), cpu, cuda or cuda:N")
        return value

    @field_validator("eval_eps", mode="before")
    @classmethod
    def _eval_eps(cls, value: object) -> tuple[float, ...]:
        values = value if isinstance(value, (list, tuple)) else [value]
        return tuple(parse_eps(v) for v in values)

    @field_validator("word_candidates")
    @classmethod
    def _word_candidates(cls, value: str) -> str:
        return check_word_candidates(value)

    @field_validator("pgd_step_size", mode="before")
    @classmethod
    def _step(cls, value: object) -> float:
        return parse_eps(value)

    @property
    def run_task(self) -> Task:
        """The task this run trains and evaluates for: ``task``, or the model kind's main task."""
        return self.task if self.task is not None else model_kind(self.model).task

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.task is not None and self.task not in model_kind(self.model).tasks:
            kind = model_kind(self.model)
            raise ValueError(f"task {self.task.value!r} is not one that model {self.model!r} does: its kind does "
                             f"{', '.join(t.value for t in kind.tasks)}; set task to one of those (or leave it out for "
                             f"{kind.task.value})")
        if self.defense is Defense.MAVA and self.a == self.b == self.c == 0:
            raise ValueError("a, b and c are all 0: the MAVA loss would be zero; set at least one > 0")
        if self.defense is Defense.MAVA and self.neighbours is NeighbourMode.AUTHORS_PGD2:
            if self.mava_random_start:
                raise ValueError("neighbours: authors_pgd2 is the authors' pgd_2, which starts at the clean image: "
                                 "set mava_random_start: false")
            if self.pgd_steps < self.N + 1:
                raise ValueError(f"neighbours: authors_pgd2 averages the last N+1 = {self.N + 1} PGD iterates, but pgd_steps "
                                 f"is {self.pgd_steps}: set pgd_steps to {self.N + 1} or more, or lower N")
        if self.ablate is not AblatedTerm.NONE and self.defense is not Defense.MAVA:
            raise ValueError(f"ablate: {self.ablate.value} removes a term of MAVA's loss, but defense is {self.defense.value}: "
                             "use defense: mava, or ablate: none")
        mlm_problem = embedded_mlm_problem(self.word_candidates, self.eval_data, self.eval_attacks)
        if mlm_problem:
            raise ValueError(mlm_problem)
        problems = captioner_problems(self) if is_captioner_spec(self.model) else []
        if problems:
            raise ValueError(f"model {self.model!r} is a captioning model (no text encoder): " + "; ".join(problems))
        return self


def captioner_problems(config: TrainConfig) -> list[str]:
    """The options a captioning model (no text encoder) cannot honour, each with its fix; [] when none.

    A captioner has no text features, so MAVA trains it with the paper's Eq. 8
    (App. A.4): the inner PGD maximises L_VSSE and the outer step minimises
    ``b*L_VSSE + c*L_SCA``; L_CMS does not exist. Options that would only matter for
    L_CMS are refused rather than ignored, so a run's recorded options are the
    objective it trained with (``a`` is recorded as 0, not as Eq. 6's default 0.002).
    The training loop checks the loaded model again (``model.has_text_encoder``).
    """
    problems = []
    if config.defense is Defense.TECOA:
        problems.append("defense 'tecoa' needs caption features (its classes are text embeddings); "
                        "use defense: mava (Eq. 8) or fare")
    if config.defense is Defense.MAVA:
        if config.a != 0:
            problems.append(f"a={config.a:g} weights L_CMS, which the captioner's objective (the paper's Eq. 8, "
                            "b*L_VSSE + c*L_SCA) does not have (0.002 is Eq. 6's default, for models with a text encoder); set a: 0")
        if config.cms_form is not CmsForm.ONE_MINUS_COS:
            problems.append(f"cms_form={config.cms_form.value} shapes L_CMS, which Eq. 8 does not have; leave cms_form at its default")
        if config.inner_text_distance:
            problems.append("inner_text_distance: true adds a distance to caption features, which need a text encoder; "
                            "set inner_text_distance: false")
    if config.eval_attacks:
        problems.append(f"eval_attacks {list(config.eval_attacks)}: a captioner's per-epoch evaluation scores clean captions "
                        "only (white-box retrieval attacks need a text encoder; attacks crafted on a retrieval surrogate are "
                        "scored by python -m platform.evaluate_captions --attack ... --surrogate ...); set eval_attacks: [] "
                        "(on a command line: --set eval_attacks=)")
    return problems


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
