"""What a report reads from MLflow: the sweeps (parent runs) and trials (child runs) of one experiment.

Everything here is a record MLflow already holds: params and tags as logged,
each metric's final value and per-epoch history, the checkpoint artifact's
path. Nothing is recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from platform.compare import CAPTION_RANK, GROUP_TAGS, caption_columns, find_experiment, is_caption_metric, recall_columns
from trainables.errors import UserError
from trainables.names import (CHECKPOINT_ARTIFACT_DIR, CLEAN, FAILURE_TAG, GRADNORM_KEYS, LOSS_KEYS, ROLE_SWEEP, ROLE_TAG, ROLE_TRIAL,
                              SCORING_TAG, STATUS_FINISHED, SWEEP_TAG, TASK_TAG, TRIAL_TAG, VISION_FILE, train_metric)
from trainables.tasks import Task, task_of_metrics

MAX_RUNS = 5000  # one search page; far above any sweep this platform runs
# The parameters the paper searches: always plotted when they vary, even across sweeps.
PAPER_PARAMS = ("a", "b", "c", "N", "M", "eps", "lr")
CLEAN_TR1 = f"{CLEAN}/tr1"


@dataclass(frozen=True)
class Sweep:
    """One sweep's parent run: its search space and objectives as the sweep logged them."""

    run_id: str
    sweep_id: str
    space: dict[str, dict]  # key -> {"distribution": ..., "low"/"high" | "values" | "value"}
    objectives: list[dict]  # [{"metric": "pgd/eps4/tr1", "mode": "max"}, ...]

    def searched(self) -> list[str]:
        """Keys the sweep actually searched (fixed values are not a search dimension)."""
        return [k for k, d in self.space.items() if d.get("distribution") != "fixed"]


@dataclass(frozen=True)
class Trial:
    """One trial's child run: tags, params (as logged strings), final metrics and per-epoch histories."""

    run_id: str
    run_name: str
    sweep_id: str
    trial_id: str
    status: str
    model: str
    defense: str
    eps: str
    params: dict[str, str]
    metrics: dict[str, float]
    checkpoint: str | None  # artifact URI of the robust encoder, None when the run has none
    failure: str | None = None  # last line of why the trial failed (the error itself), as the sweep tagged it
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]
    task: Task = Task.RETRIEVAL  # as tagged (mava.task); runs recorded before the tag: the task of their metrics
    scoring: str | None = None  # how recall ranked candidates (mava.scoring: itc, itc+itm@128 ...), as tagged

    @property
    def group(self) -> tuple[str, str]:
        return self.model, self.defense


@dataclass(frozen=True)
class ExperimentRecords:
    name: str
    experiment_id: str
    tracking_uri: str
    sweeps: list[Sweep]
    trials: list[Trial]

    def sweep(self, sweep_id: str) -> Sweep | None:
        return next((s for s in self.sweeps if s.sweep_id == sweep_id), None)

    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == STATUS_FINISHED]

    def metric_names(self) -> set[str]:
        return {name for t in self.trials for name in t.metrics}

    def searched_params(self, trials: list[Trial] | None = None) -> list[str]:
        """Searched keys of every sweep, plus any paper parameter whose value differs between trials.

        Given ``trials``, only their sweeps and their values count: a captioner sweep's
        scatter has no panel for the ``a`` a retrieval sweep searched (a captioner's is 0).
        """
        if trials is None:
            sweeps, trials = self.sweeps, self.trials
        else:
            sweeps = [s for s in self.sweeps if s.sweep_id in {t.sweep_id for t in trials}]
        keys = [k for s in sweeps for k in s.searched()]
        keys += [k for k in PAPER_PARAMS if len({t.params.get(k) for t in trials if k in t.params}) > 1]
        return list(dict.fromkeys(keys))


def curve_metrics(metric_names: set[str]) -> tuple[list[str], list[str]]:
    """(loss terms, eval columns: recall@1, or a captioner's caption metrics) present among ``metric_names``, in a fixed order."""
    losses = [train_metric(k) for k in LOSS_KEYS if train_metric(k) in metric_names]
    return losses, recall_columns(metric_names) + caption_columns(metric_names)


def load_records(client: MlflowClient, experiment_name: str, tracking_uri: str) -> ExperimentRecords:
    """Every sweep and trial run of an experiment, or a UserError saying why there is nothing to report."""
    experiment = find_experiment(client, experiment_name)
    ids = [experiment.experiment_id]
    parents = client.search_runs(ids, filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'", max_results=MAX_RUNS, order_by=["attributes.start_time ASC"])
    runs = client.search_runs(ids, filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'", max_results=MAX_RUNS, order_by=["attributes.start_time ASC"])
    if not runs:
        raise UserError(f"experiment {experiment_name!r} has no trial runs: run a sweep into it first "
                        f"(python -m platform.sweep --space search_spaces/abc.yaml) or pass the --experiment that holds one")
    sweeps = [_sweep(run) for run in parents]
    trials = [_trial(client, run) for run in runs]
    return ExperimentRecords(experiment_name, experiment.experiment_id, tracking_uri, sweeps, trials)


def _sweep(run: Run) -> Sweep:
    params = run.data.params
    # Both params are JSON written by platform.sweep; a parent run from another tool simply has none.
    space = json.loads(params["space"]) if "space" in params else {}
    objectives = json.loads(params["objectives"]) if "objectives" in params else []
    return Sweep(run.info.run_id, run.data.tags.get(SWEEP_TAG, run.info.run_name), space, objectives)


def _trial(client: MlflowClient, run: Run) -> Trial:
    tags = run.data.tags
    losses, evals = curve_metrics(set(run.data.metrics))
    gradnorms = [train_metric(k) for k in GRADNORM_KEYS if train_metric(k) in run.data.metrics]  # the curves' third panel
    history = {}
    for key in [*losses, *evals, *gradnorms]:
        points = client.get_metric_history(run.info.run_id, key)
        history[key] = sorted((int(m.step), float(m.value)) for m in points)
    model, defense, eps = (tags.get(t, "?") for t in GROUP_TAGS)
    return Trial(run.info.run_id, run.info.run_name or run.info.run_id, tags.get(SWEEP_TAG, "?"), tags.get(TRIAL_TAG, "?"),
                 run.info.status, model, defense, eps, dict(run.data.params), dict(run.data.metrics),
                 _checkpoint_uri(client, run), _last_line(tags.get(FAILURE_TAG)), history,
                 Task(tags[TASK_TAG]) if TASK_TAG in tags else task_of_metrics(set(run.data.metrics)), tags.get(SCORING_TAG))


def _last_line(text: str | None) -> str | None:
    # The tag holds the tail of an error report; its last line is the error itself.
    return text.strip().splitlines()[-1][:300] if text and text.strip() else None


def _checkpoint_uri(client: MlflowClient, run: Run) -> str | None:
    # The weights are uploaded when a trial completes; a failed or running trial has none to point to.
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT_DIR)}
    if VISION_FILE not in names:
        return None
    return f"{run.info.artifact_uri}/{CHECKPOINT_ARTIFACT_DIR}/{VISION_FILE}"


def default_objective(records: ExperimentRecords) -> str | None:
    """The metric the report plots: the sweeps' first robust objective, else the last robust TR@1 column.

    An experiment without robust recall (only captioners, whose sweeps score clean captions)
    falls to its sweeps' first caption objective, else ``clean/cider`` when a trial recorded it.
    """
    for sweep in records.sweeps:
        for objective in sweep.objectives:
            if not objective["metric"].startswith(f"{CLEAN}/"):
                return objective["metric"]  # even before any trial recorded it: the page then says so
    robust = [c for c in recall_columns(records.metric_names()) if not c.startswith(f"{CLEAN}/") and c.endswith("/tr1")]
    if robust:
        return robust[-1]
    for sweep in records.sweeps:
        for objective in sweep.objectives:
            if is_caption_metric(objective["metric"]):
                return objective["metric"]
    return CAPTION_RANK if CAPTION_RANK in records.metric_names() else None


def sweep_objective(sweep: Sweep, trials: list[Trial], preferred: str) -> str:
    """``preferred`` if a finished trial of ``sweep`` recorded it, else the sweep's own first objective.

    In an experiment mixing retrieval and captioner sweeps the report's objective is a
    robust recall, which a captioner sweep never records: its own objective (``clean/cider``)
    is the one its importances and scatter can show.
    """
    recorded = any(t.sweep_id == sweep.sweep_id and t.status == STATUS_FINISHED and preferred in t.metrics for t in trials)
    if recorded or not sweep.objectives:
        return preferred
    return sweep.objectives[0]["metric"]


def objective_mode(records: ExperimentRecords, metric: str) -> str:
    """``max`` or ``min`` as a sweep declared it for ``metric``; recall is higher-is-better otherwise."""
    for sweep in records.sweeps:
        for objective in sweep.objectives:
            if objective["metric"] == metric:
                return objective.get("mode", "max")
    return "max"
