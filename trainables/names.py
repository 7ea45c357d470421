"""One spelling for every name the loop, the tracker, the comparison and the dashboards share.

Metric keys and prefixes, MLflow tags and run statuses, artifact and checkpoint file
names live here and nowhere else: ``tests/test_names.py`` reads every module-level
string constant of this file and fails on the same string written as a literal in
any other source file (prefixes such as ``final/`` also at the start of a literal).
"""

from __future__ import annotations

# ---- metric keys (the last part of a metric name) -----------------------------------------
RECALL_KEYS = ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10")
# COCO caption metrics (x100) of a captioner's evaluation (trainables.evaluation.captioning).
CAPTION_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
# Computed in pure Python, so present in every result (METEOR needs Java, SPICE downloaded jars):
# the keys a sweep may optimise.
ALWAYS_COMPUTED_CAPTION_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
# Visual grounding (trainables.evaluation.grounding_eval): accuracy in percent (IoU >= 0.5) over every referring
# expression, and per split where the data has it (RefCOCO+ val/testA/testB; synthetic-vg:test has all three).
GROUNDING_SPLIT_KEYS = {"val": "acc_val", "testA": "acc_testA", "testB": "acc_testB"}
GROUNDING_KEYS = ("acc",) + tuple(GROUNDING_SPLIT_KEYS.values())
# Visual entailment (trainables.evaluation.entailment_eval): accuracy in percent, ALBEF's correct / total.
ENTAILMENT_KEYS = ("acc",)
LOSS_KEYS = ("loss", "l_cms", "l_vsse", "l_sca", "l_fare", "l_tecoa")
# Per-epoch norm of the gradient each weighted loss term alone gives the trainable vision parameters, measured
# on the epoch's first batch (``train/gradnorm_cms`` = ||grad a*L_CMS||): how the terms of Eq. 6 are balanced.
GRADNORM_KEYS = ("gradnorm_cms", "gradnorm_vsse", "gradnorm_sca", "gradnorm_fare", "gradnorm_tecoa")
EPOCH = "epoch"
CLEAN = "clean"  # the attack name of unperturbed images in metric names and result rows

# ---- metric prefixes --------------------------------------------------------------------------
TRAIN_PREFIX = "train/"  # per-epoch averages of the loss terms
TIME_PREFIX = "time/"  # seconds spent per epoch, in setup, ...
FINAL_PREFIX = "final/"  # an objective, reported under this prefix by the last epoch only (Optuna never sees partial values)
SWEEP_PREFIX = "sweep/"  # metrics of a sweep's parent run
ERROR_PREFIX = "error/"  # a worker's reason for stopping a trial
NONFINITE_KEY = ERROR_PREFIX + "nonfinite_loss"
TRAIN_SECONDS = TIME_PREFIX + "train_seconds"
EPOCH_SECONDS = TIME_PREFIX + "epoch_seconds"
SETUP_SECONDS = TIME_PREFIX + "setup_seconds"
SWEEP_WALL_SECONDS = SWEEP_PREFIX + "wall_seconds"

# ---- MLflow tags ------------------------------------------------------------------------------
TAG_PREFIX = "mava."  # every tag the platform sets
SWEEP_TAG = TAG_PREFIX + "sweep_id"
TRIAL_TAG = TAG_PREFIX + "trial_id"
ROLE_TAG = TAG_PREFIX + "role"  # ROLE_SWEEP on the parent run, ROLE_TRIAL on each child run
MODEL_TAG = TAG_PREFIX + "model"  # the model spec as the user wrote it
MODEL_FAMILY_TAG = TAG_PREFIX + "model_family"  # the model kind's family (clip, blip, ...)
TASK_TAG = TAG_PREFIX + "task"  # the task the trial was trained and evaluated for (trainables.tasks)
# How a retrieval trial's recall was scored: "itc" (cosine) or the ITM re-ranking, e.g. "itm@128" (trainables.evaluation.rerank).
SCORING_TAG = TAG_PREFIX + "scoring"
DEFENSE_TAG = TAG_PREFIX + "defense"
EPS_TAG = TAG_PREFIX + "eps"  # training eps as the paper writes it: "4/255"
FAILURE_TAG = TAG_PREFIX + "failure"  # why a trial failed (e.g. its loss became NaN), on its FAILED child run
REPORT_ERROR_TAG = TAG_PREFIX + "report_error"  # why the report could not be logged (the sweep's results are unaffected)
REGISTERED_AS_TAG = TAG_PREFIX + "registered_as"  # on a registered trial whose version is not a pyfunc model: why
BEST_RUN_TAG = TAG_PREFIX + "best_run_id"  # on the parent run: the registered trial
FAILED_TRIALS_TAG = TAG_PREFIX + "failed_trials"
# The sha256 of the base model's weights every worker of a trial loaded (a param and a tag of each trial).
BASE_WEIGHTS_SHA256 = "base_weights_sha256"
# Under a trial's "sweep" settings: the canonical data specs every worker loads (platform/specs.py).
PINNED_SPECS_KEY = "pinned_specs"
# Under a trial's "sweep" settings: each model a trial may run, [{"name": as the user wrote it, "spec": the canonical
# spec every worker loads, "sha256": its weights' sha256}] (one entry, or one per value when ``model`` is searched).
PINNED_MODELS_KEY = "pinned_models"
PARENT_RUN_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest child runs
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"

# ---- run statuses (MLflow's RunStatus names; trainables does not import MLflow) ----------------
STATUS_RUNNING = "RUNNING"
STATUS_FINISHED = "FINISHED"
STATUS_FAILED = "FAILED"
STATUS_KILLED = "KILLED"
ENDED_STATUSES = (STATUS_FINISHED, STATUS_FAILED, STATUS_KILLED)

# ---- artifacts and checkpoint files --------------------------------------------------------------
VISION_FILE = "vision.safetensors"  # the fine-tuned vision encoder (what users share)
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"  # epoch, optimiser hyperparameters, config and metrics of a checkpoint
CARD_FILE = "card.json"  # beside a published robust encoder: what it is, its metrics, its sha256
CHECKPOINT_ARTIFACT_DIR = "checkpoint"  # the MLflow artifact folder holding VISION_FILE and CARD_FILE
EXAMPLES_ARTIFACT_DIR = "examples"  # the MLflow artifact folder of a trial's adversarial-example pictures (index.html)
CHECKPOINT_PATH_KEY = "checkpoint_path"  # Ray's result key for a reported checkpoint's location (ray.tune.integration)
DONE_FILE = "mava-trial-result.json"  # beside a finished Train run's checkpoints: its final result
NONFINITE_FILE = "nonfinite.json"  # the marker checkpoint of a trial stopped by a NaN/inf loss
RESULTS_FILE = "results.json"  # platform.finetune's numbers, beside its checkpoints
# Beside an evaluated epoch's checkpoint (and under CHECKPOINT_ARTIFACT_DIR in MLflow): every test image's and
# caption's rank, clean and per attack x eps (trainables.evaluation.uncertainty): what a bootstrap resamples.
RANKS_FILE = "eval_ranks.parquet"

# Values that are also plain words other names coincide with (a table's "trial" and "checkpoint" columns,
# the "sweep" section of a trial's config): code uses the constants where it means these names, but the
# literal scan (tests/test_names.py) does not flag the words themselves.
COMMON_WORDS = frozenset({ROLE_SWEEP, ROLE_TRIAL, CHECKPOINT_ARTIFACT_DIR})
# Param of a trial's run: images per optimiser step, batch_size (per worker) x workers_per_trial (DDP averages them).
EFFECTIVE_BATCH_SIZE = "effective_batch_size"


def eps_label(eps: float) -> str:
    """``4/255 -> "eps4"``, ``3.5/255 -> "eps3.5"``: eps in 0-255 units, as the paper writes it."""
    value = round(eps * 255, 3)
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return f"eps{text}"


def eps_fraction(eps: float) -> str:
    """``4/255 -> "4/255"`` for tables, tags and JSON rows."""
    return f"{eps_label(eps)[3:]}/255"


def metric_name(attack: str, eps: float | None, key: str) -> str:
    """``("clean", None, "tr1") -> "clean/tr1"``, ``("pgd", 4/255, "tr1") -> "pgd/eps4/tr1"``."""
    if attack == CLEAN:
        return f"{CLEAN}/{key}"
    return f"{attack}/{eps_label(eps)}/{key}"


def train_metric(key: str) -> str:
    """Per-epoch training loss terms: ``"train/l_cms"``."""
    return TRAIN_PREFIX + key


def gradnorm_key(loss_key: str) -> str:
    """The gradient-norm key of a loss term: ``"l_cms" -> "gradnorm_cms"`` (one of GRADNORM_KEYS)."""
    key = "gradnorm_" + loss_key.removeprefix("l_")
    if key not in GRADNORM_KEYS:
        raise ValueError(f"no gradient-norm metric for loss term {loss_key!r}: known {', '.join(GRADNORM_KEYS)}")
    return key


def final_metric(metric: str) -> str:
    """An objective as the last epoch reports it: ``"final/pgd/eps2/tr1"``."""
    return FINAL_PREFIX + metric
