"""What a finished sweep reports: trial rows, the Pareto front, a text table, and the best encoder registered in MLflow."""

from __future__ import annotations

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune

from platform.mlflow_ui import log_report
from platform.search import final_key
from platform.sweep_spec import SweepSpec
from platform.tracking import ROLE_TAG, SWEEP_TAG, TRIAL_TAG, find_run, register_best
from trainables.names import BEST_RUN_TAG, EPOCH, FAILED_TRIALS_TAG, ROLE_TRIAL, STATUS_FAILED, STATUS_FINISHED, SWEEP_WALL_SECONDS
from trainables.ray_worker import training_options


def pareto_front(rows: list[dict], spec: SweepSpec) -> list[dict]:
    """Completed trials that no other trial beats on every objective."""
    signs = [1 if o.mode.value == "max" else -1 for o in spec.search.objectives]
    metrics = spec.objective_metrics()
    scored = [r for r in rows if all(r.get(m) is not None for m in metrics)]

    def dominates(x, y):
        a = [s * x[m] for s, m in zip(signs, metrics)]
        b = [s * y[m] for s, m in zip(signs, metrics)]
        return all(p >= q for p, q in zip(a, b)) and any(p > q for p, q in zip(a, b))

    return [r for r in scored if not any(dominates(o, r) for o in scored if o is not r)]


def trial_rows(results: tune.ResultGrid, spec: SweepSpec) -> list[dict]:
    """One row per trial: its id, status, searched values, epochs reached and final objective values."""
    rows = []
    for result in results:
        config = training_options(result.config) if result.config else {}
        metrics = result.metrics or {}
        row = {"trial": metrics.get("trial_id", "?"), "status": "ERROR" if result.error else "OK"}
        row.update({k: config.get(k) for k in spec.searched_keys()})  # with search.seeds, also each trial's seed
        row["epochs"] = metrics.get(EPOCH)
        for metric in spec.objective_metrics():
            row[metric] = metrics.get(final_key(metric))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def ended_trials(client: MlflowClient, experiment_id: str, sweep_id: str) -> int:
    """Trials of this sweep whose MLflow child run has ended (finished or failed)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`{ROLE_TAG}` = '{ROLE_TRIAL}'")
    return sum(1 for run in runs if run.info.status in (STATUS_FINISHED, STATUS_FAILED))


def best_trial_run(client: MlflowClient, experiment_id: str, sweep_id: str, spec: SweepSpec, front: list[dict]) -> str | None:
    """The MLflow run of the best finished trial by the first objective (among the Pareto front)."""
    if not front:
        return None
    objective = spec.search.objectives[0]
    best = (max if objective.mode.value == "max" else min)(front, key=lambda r: r[objective.metric])
    return find_run(client, experiment_id, {SWEEP_TAG: sweep_id, TRIAL_TAG: best["trial"]})


def finish_sweep(client: MlflowClient, spec: SweepSpec, summary: dict, wall_seconds: float) -> None:
    """Register the best encoder (if asked; one per model when ``model`` is searched), record the sweep's wall time and
    failures, and end the parent run.

    Adds ``registered`` (a list of ``{name, version, run_id, model}``) to ``summary`` when a model version was registered.
    """
    parent_run_id, experiment_id, sweep_id = summary["parent_run_id"], summary["experiment_id"], summary["sweep_id"]
    best = best_trial_run(client, experiment_id, sweep_id, spec, summary["pareto_front"])
    if best is not None and spec.tracking.register_best:
        registered = []
        for model, model_name in spec.registered_model_names().items():
            if model is None:  # one model: its best is the sweep's best
                run_id = best
            else:
                rows = [row for row in summary["rows"] if row.get("model") == model]
                run_id = best_trial_run(client, experiment_id, sweep_id, spec, pareto_front(rows, spec))
            if run_id is not None:
                registered.append({"name": model_name, "version": register_best(client, run_id, model_name), "run_id": run_id,
                                   "model": model})
        summary["registered"] = registered
        client.set_tag(parent_run_id, BEST_RUN_TAG, best)
    log_report(client, summary["tracking_uri"], experiment_id, parent_run_id)  # opens inside MLflow: report/report.html
    client.log_metric(parent_run_id, SWEEP_WALL_SECONDS, wall_seconds)
    rows = summary["rows"]
    failed = sum(1 for r in rows if r["status"] != "OK")
    client.set_tag(parent_run_id, FAILED_TRIALS_TAG, str(failed))
    client.set_terminated(parent_run_id, status=RunStatus.to_string(RunStatus.FINISHED if failed < len(rows) else RunStatus.FAILED))
