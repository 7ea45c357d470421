"""What a person sees when they open a sweep in the MLflow UI (``mlflow ui --backend-store-uri ...``).

MLflow 3's UI opens an experiment on the GenAI "traces" view unless the experiment is
tagged as model training (``mlflow.experimentKind``); it shows ``mlflow.note.content`` as
the description of an experiment or a run. A sweep therefore tags its experiment as
training, describes the experiment and its parent run (the sweep file, the objectives,
how to read the runs), and at its end logs the HTML report (``dashboards.report``) as an
artifact of the parent run, which the UI's artifact viewer opens in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from trainables.names import REPORT_ERROR_TAG

# MLflow's own tag names and value (the UI's ExperimentKind enum); MLflow exports no constant for the first.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
NOTE_TAG = MLFLOW_RUN_NOTE  # "mlflow.note.content": the description of an experiment or a run
# A saved runs-table view (what the UI's "Share" button writes): experiment tag PREFIX + key, opened by ?viewStateShareKey=key.
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
# The UI's default columns (attributes.`Source`, `Models`, `Dataset`); the sweep view adds the objective metrics.
DEFAULT_COLUMNS = ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`"]
REPORT_ARTIFACT_DIR = "report"
REPORT_FILE = "report.html"


logger = logging.getLogger(__name__)

HOW_TO_READ = """\
**How to read the runs.** Each sweep is one *parent* run (role `sweep`); each of its trials is a
*child* run nested under it (expand the parent in the runs table). A trial's params are every
training option; its metrics are logged per epoch (`train/*` losses, `clean/tr1` … recall, and
`ATTACK/epsE/tr1` robust recall under each evaluation attack at eps E/255). Finished trials hold
the robust vision encoder under the artifact `checkpoint/` (safetensors + `card.json`). The
parent run's artifact `report/report.html` is the sweep report (paper-style table, trade-off,
importances, learning curves). The best trial is registered as the model `<experiment>-robust-vision`
(a sweep that searches `model`: each model's best as `<experiment>-<model>-robust-vision`), alias
`best`: `mlflow.pyfunc.load_model("models:/<name>@best")` embeds images."""


def _objectives(params: dict[str, Any]) -> list[dict]:
    return json.loads(params["objectives"]) if "objectives" in params else []


def _objectives_text(params: dict[str, Any]) -> str:
    objectives = _objectives(params)
    return ", ".join(f"`{o['metric']}` ({o['mode']})" for o in objectives) or "(none recorded)"


def shared_view_key(sweep_id: str) -> str:
    return "sweep-" + hashlib.sha256(sweep_id.encode()).hexdigest()[:16]


def sweep_view_url(experiment_id: str, sweep_id: str) -> str:
    """The UI route of the sweep's saved view (relative to the server root)."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={shared_view_key(sweep_id)}"


def sweep_view_state(params: dict[str, Any]) -> dict:
    """A runs-table view sorted by the first objective with every objective as a column."""
    metrics = [f"metrics.`{o['metric']}`" for o in _objectives(params)]
    state: dict[str, Any] = {"selectedColumns": DEFAULT_COLUMNS + metrics}
    if metrics:
        state.update(orderByKey=metrics[0], orderByAsc=_objectives(params)[0]["mode"] == "min")
    return state


def sweep_note(sweep_id: str, params: dict[str, Any], view_url: str = "") -> str:
    """Markdown description of a sweep's parent run, from the params ``run_sweep`` gives it."""
    space = json.loads(params["space"]) if "space" in params else {}
    searched = ", ".join(f"`{k}` ({v['distribution']})" for k, v in space.items()) or "(none)"
    sweep_file = params["sweep_file"] if "sweep_file" in params else "(not recorded)"
    lines = [f"**Sweep {sweep_id}**", "",
             f"- sweep file: `{sweep_file}`",
             f"- search: {params['algorithm'] if 'algorithm' in params else '?'}, {params['num_trials'] if 'num_trials' in params else '?'} trials",
             f"- objectives: {_objectives_text(params)}",
             f"- searched: {searched}"]
    if view_url:
        lines.append(f"- [all trials with their objectives as columns]({view_url})")
    lines += ["", HOW_TO_READ]
    return "\n".join(lines)


def experiment_note(experiment_name: str, sweep_id: str, params: dict[str, Any], view_url: str = "") -> str:
    """Markdown description of the experiment: what it holds and its latest sweep."""
    sweep_file = params["sweep_file"] if "sweep_file" in params else "(not recorded)"
    view = f" [Its trials with the objectives as columns]({view_url})." if view_url else ""
    return "\n".join([
        f"**{experiment_name}**: adversarial fine-tuning sweeps of a vision-language model's vision encoder (MAVA platform).",
        "", f"Latest sweep: `{sweep_id}` from `{sweep_file}`, objectives {_objectives_text(params)}.{view}",
        "Re-run or resume with `python -m platform.sweep --space SWEEP_FILE [--resume SWEEP_ID]`.", "", HOW_TO_READ])


def describe_sweep(client: MlflowClient, experiment_id: str, parent_run_id: str, sweep_id: str, params: dict[str, Any]) -> None:
    """Tag the experiment as model training, save the sweep's runs-table view, describe the experiment and the parent run."""
    experiment = client.get_experiment(experiment_id)
    view_url = sweep_view_url(experiment_id, sweep_id)
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG_PREFIX + shared_view_key(sweep_id), json.dumps(sweep_view_state(params)))
    client.set_experiment_tag(experiment_id, NOTE_TAG, experiment_note(experiment.name, sweep_id, params, view_url))
    client.set_tag(parent_run_id, NOTE_TAG, sweep_note(sweep_id, params, view_url))


def log_report(client: MlflowClient, tracking_uri: str, experiment_id: str, parent_run_id: str) -> str | None:
    """Build the experiment's HTML report and log it as ``report/report.html`` of the parent run; returns its artifact path.

    The sweep's results are already recorded when this runs, so a report that cannot be
    built does not fail the sweep: the reason goes to the parent run's ``mava.report_error``
    tag (and the log), and ``python -m dashboards.report`` can be run again by hand.
    """
    # Imported here: dashboards.records imports platform.tracking, which imports this module.
    from dashboards.report import build_report

    name = client.get_experiment(experiment_id).name
    with tempfile.TemporaryDirectory() as staging:
        try:
            report = build_report(client, name, tracking_uri, Path(staging) / REPORT_FILE)
        except Exception as error:  # any failure of the optional report; recorded, never hidden
            reason = f"{type(error).__name__}: {error}"[:4000]
            logger.warning("the sweep report was not logged to MLflow (%s); build it with python -m dashboards.report", reason)
            client.set_tag(parent_run_id, REPORT_ERROR_TAG, reason)
            return None
        client.log_artifact(parent_run_id, str(report.html_path), REPORT_ARTIFACT_DIR)
    return f"{REPORT_ARTIFACT_DIR}/{REPORT_FILE}"
