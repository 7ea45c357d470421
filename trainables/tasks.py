"""Tasks: the closed set of things a fine-tuned model is evaluated on, each described once.

A model kind (``trainables.models.MODEL_KINDS``) declares the tasks it supports; a
run's task is its model's first one. Everything that used to be decided by asking
"is this spec a captioner?" asks the task instead: which evaluator scores an epoch,
which metric names that evaluation records, which of them a sweep may optimise,
which defenses can train for it, and what the published card says the numbers mean.

Adding a task (the ALBEF/TCL issue adds entailment and grounding) is one member of
:class:`Task` and one entry of :data:`TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from trainables.evaluation.captioning import CaptionEvalSettings, evaluate_captioning
from trainables.evaluation.entailment_eval import evaluate_entailment_epoch
from trainables.evaluation.grounding_eval import evaluate_grounding_epoch
from trainables.evaluation.robustness import EvalSettings, evaluate_retrieval_rows, metrics_from_rows
from trainables.evaluation.uncertainty import write_ranks
from trainables.names import (ALWAYS_COMPUTED_CAPTION_KEYS, CAPTION_KEYS, CLEAN, ENTAILMENT_KEYS, GROUNDING_KEYS, GROUNDING_SPLIT_KEYS,
                              RECALL_KEYS, metric_name)


class Task(str, Enum):
    RETRIEVAL = "retrieval"  # image-text retrieval: recall@k, clean and under white-box attacks
    CAPTIONING = "captioning"  # image captioning: COCO caption metrics of clean captions
    ENTAILMENT = "entailment"  # visual entailment: 3-way accuracy, clean and under white-box attacks
    GROUNDING = "grounding"  # weakly supervised visual grounding: accuracy (IoU >= 0.5), clean and under attack


@dataclass(frozen=True)
class EpochEval:
    """What the training loop's evaluation after an epoch needs, whatever the task."""

    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    batch_size: int
    seed: int
    k_test: int = 128  # ITM re-ranking depth, for models with an ITM head (trainables.evaluation.rerank)
    word_candidates: str | None = None  # the text attacks' word source (trainables.attacks.word_candidates); None = offline
    ranks_file: Path | None = None  # retrieval: also write every query's rank here (trainables.evaluation.uncertainty)


# (model, dataset, settings, progress) -> metrics named metric_name(attack, eps, key).
Evaluator = Callable[[object, Dataset, EpochEval, bool], dict[str, float]]


def _evaluate_retrieval(model, dataset: Dataset, settings: EpochEval, progress: bool) -> dict[str, float]:
    eval_settings = EvalSettings(attacks=settings.attacks, eps=settings.eps, batch_size=settings.batch_size, seed=settings.seed,
                                 k_test=settings.k_test, text_candidates=settings.word_candidates)
    rows = evaluate_retrieval_rows(model, dataset, eval_settings, progress=progress)
    if settings.ranks_file is not None:
        write_ranks(settings.ranks_file, [row.ranks for row in rows if row.ranks is not None])
    return metrics_from_rows(rows)


def _evaluate_captioning(model, dataset: Dataset, settings: EpochEval, progress: bool) -> dict[str, float]:
    # Clean captions only: a captioner has no text encoder, so white-box retrieval attacks do not apply;
    # its robust numbers need attacks crafted on a retrieval surrogate (python -m platform.evaluate_captions).
    eval_settings = CaptionEvalSettings(eps=(), batch_size=settings.batch_size, seed=settings.seed)
    return evaluate_captioning(model, dataset, settings=eval_settings, progress=progress).metrics


@dataclass(frozen=True)
class TaskInfo:
    """One task.

    Attributes:
        evaluate: the per-epoch evaluation (metrics named ``clean/<key>``, ``<attack>/eps<e>/<key>``).
        metric_keys: every key its evaluation can record.
        objective_keys: the keys a sweep may optimise (always computed, wherever the sweep runs).
        summary_keys: the two or so columns a short table shows (platform.finetune).
        table_keys: the columns of the paper-style comparison table (platform.compare).
        rank_key: the key that ranks trials by default in a comparison; None: the last robust TR@1 column.
        defenses: the defense names (``trainables.config.Defense`` values) that can train for it.
        white_box_eval: whether the per-epoch evaluation runs white-box attacks (``eval_attacks``).
        threat_model: what the card of a published encoder says its numbers are.
        produces: what its per-epoch evaluation records, for messages about objectives.
    """

    evaluate: Evaluator
    metric_keys: tuple[str, ...]
    objective_keys: tuple[str, ...]
    summary_keys: tuple[str, ...]
    table_keys: tuple[str, ...]
    rank_key: str | None
    defenses: tuple[str, ...]
    white_box_eval: bool
    threat_model: str
    produces: str

    def objectives(self, eval_attacks: tuple[str, ...], eval_eps: tuple[float, ...]) -> list[str]:
        """Metric names a sweep of this task may optimise, given the per-epoch evaluation's attacks and eps."""
        names = [metric_name(CLEAN, None, key) for key in self.objective_keys]
        if self.white_box_eval:
            names += [metric_name(a, eps, key) for a in eval_attacks for eps in eval_eps for key in self.objective_keys]
        return names

    def owns_metric(self, name: str) -> bool:
        """Whether a recorded metric (``clean/cider``, ``pgd/eps2/tr1``) is one this task's evaluation writes."""
        return name.rsplit("/", 1)[-1] in self.metric_keys


TASKS: dict[Task, TaskInfo] = {
    Task.RETRIEVAL: TaskInfo(
        evaluate=_evaluate_retrieval, metric_keys=RECALL_KEYS, objective_keys=RECALL_KEYS, summary_keys=("tr1", "ir1"),
        table_keys=("tr1", "ir1"), rank_key=None, defenses=("mava", "fare", "tecoa"), white_box_eval=True,
        threat_model="white-box (attacks computed on the fine-tuned model itself)",
        produces="experiment.eval_attacks x eval_eps",
    ),
    Task.CAPTIONING: TaskInfo(
        evaluate=_evaluate_captioning, metric_keys=CAPTION_KEYS, objective_keys=ALWAYS_COMPUTED_CAPTION_KEYS,
        summary_keys=("bleu4", "cider"),
        # The paper's captioning columns (Table 8): BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE; BLEU-1..3 stay in MLflow.
        table_keys=("bleu4", "meteor", "rouge_l", "cider", "spice"), rank_key="cider",
        # TeCoA's classes are text embeddings, which a captioner does not have.
        defenses=("mava", "fare"), white_box_eval=False,
        threat_model="none: clean captions only (a captioner; transfer attacks: python -m platform.evaluate_captions)",
        # METEOR and SPICE are missing wherever Java or SPICE's jars are, so they are not objectives.
        produces="a captioner's evaluation: clean captions, BLEU/ROUGE-L/CIDEr",
    ),
    Task.GROUNDING: TaskInfo(
        # acc: every expression; acc_val/acc_testA/acc_testB: the splits the eval set holds (synthetic-vg:test has all
        # three, a RefCOCO+ val file only val): a split objective the eval set lacks is never recorded.
        evaluate=evaluate_grounding_epoch, metric_keys=GROUNDING_KEYS, objective_keys=GROUNDING_KEYS,
        summary_keys=GROUNDING_KEYS[:1], table_keys=GROUNDING_KEYS, rank_key=GROUNDING_KEYS[0],
        defenses=("mava", "fare", "tecoa"), white_box_eval=True,
        threat_model="white-box (attacks computed on the fine-tuned model itself)",
        produces="experiment.eval_attacks (any of pgd, co-attack) x eval_eps, grounding accuracy",
    ),
    Task.ENTAILMENT: TaskInfo(
        evaluate=evaluate_entailment_epoch, metric_keys=ENTAILMENT_KEYS, objective_keys=ENTAILMENT_KEYS,
        summary_keys=ENTAILMENT_KEYS, table_keys=ENTAILMENT_KEYS, rank_key=ENTAILMENT_KEYS[0], defenses=("mava", "fare", "tecoa"),
        white_box_eval=True, threat_model="white-box (attacks computed on the fine-tuned entailment model itself), all pairs scored",
        produces="experiment.eval_attacks (any of pgd, co-attack, sga) x eval_eps, on entailment pairs",
    ),
}


def task_info(task: Task | str) -> TaskInfo:
    """The description of ``task`` (a :class:`Task` or its value, e.g. a recorded tag)."""
    return TASKS[Task(task)]


def task_of_metrics(metric_names: set[str] | list[str]) -> Task:
    """The task whose evaluation wrote these metrics (runs recorded before the task tag existed)."""
    if any(task_info(Task.CAPTIONING).owns_metric(name) for name in metric_names):
        return Task.CAPTIONING
    if any(name.rsplit("/", 1)[-1] in GROUNDING_SPLIT_KEYS.values() for name in metric_names):
        return Task.GROUNDING
    if any(task_info(Task.ENTAILMENT).owns_metric(name) for name in metric_names):
        return Task.ENTAILMENT
    return Task.RETRIEVAL
