"""A sweep as people see it in the MLflow UI: training runs first, described, nested, objectives as columns, the report inside.

The UI test serves the fake sweeps' store (tests/fake_sweeps.py, written by the sweep's
own tracker) with the real ``mlflow server`` on 127.0.0.1 and reads the page the React
app renders in headless Chromium.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import REPO_ROOT, run_chromium
from platform.mlflow_ui import (EXPERIMENT_KIND_TAG, NOTE_TAG, REPORT_ARTIFACT_DIR, REPORT_FILE, SHARED_VIEW_TAG_PREFIX,
                                TRAINING_KIND, log_report, shared_view_key, sweep_view_url)
from platform.tracking import ROLE_TAG
from servers import free_port, stop_group, wait_until_answering

EXPERIMENT, SWEEP, OBJECTIVE = "retrieval", "ret-1", "pgd/eps4/tr1"  # the fake retrieval sweep
SERVER_START_SECONDS = 300  # `mlflow server` imports MLflow and migrates the store first: a minute or more on a loaded machine
UI_WAIT_MS = 30000  # Chromium's virtual time for the React app to fetch and draw the runs


def runs_of(uri: str) -> tuple[str, object, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags[ROLE_TAG] == "sweep")
    return experiment, parent, [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]


def test_the_sweep_experiment_is_tagged_as_training_and_described(fake_sweeps_store):
    experiment, parent, trials = runs_of(fake_sweeps_store)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    for note in (experiment.tags[NOTE_TAG], parent.data.tags[NOTE_TAG]):
        assert f"`{OBJECTIVE}` (max)" in note and "How to read the runs" in note and sweep_view_url(experiment.experiment_id, SWEEP) in note
    assert "searched: `a` (loguniform)" in parent.data.tags[NOTE_TAG]
    view = json.loads(experiment.tags[SHARED_VIEW_TAG_PREFIX + shared_view_key(SWEEP)])
    assert view["orderByKey"] == f"metrics.`{OBJECTIVE}`" and f"metrics.`{OBJECTIVE}`" in view["selectedColumns"] and view["orderByAsc"] is False
    assert len(trials) == 3


def test_the_report_is_logged_as_an_artifact_of_the_parent_run(fake_sweeps_store, tmp_path):
    experiment, parent, trials = runs_of(fake_sweeps_store)
    client = MlflowClient(fake_sweeps_store)
    path = log_report(client, fake_sweeps_store, experiment.experiment_id, parent.info.run_id)
    assert path == f"{REPORT_ARTIFACT_DIR}/{REPORT_FILE}"
    html = Path(client.download_artifacts(parent.info.run_id, path, str(tmp_path))).read_text(encoding="utf-8")
    assert f"Sweep report: {EXPERIMENT}" in html and all(t.info.run_id in html for t in trials)


@pytest.fixture(scope="module")
def mlflow_ui(fake_sweeps_store, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 and a free port over the fake sweeps' store; stopped (its process group) at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-ui") / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", fake_sweeps_store,
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(server, f"{url}/health", SERVER_START_SECONDS, log)
        yield url
    finally:
        stop_group(server)  # uvicorn and its worker share the group we started


def strip_svg(dom: str) -> str:
    return re.sub(r"<svg.*?</svg>", "", dom, flags=re.S)


def run_name_cells(dom: str) -> dict[str, str]:
    """{run name shown: the HTML of its Run Name cell} of the runs table."""
    cells = re.split(r'(?=<div class="ag-cell[^"]*"[^>]*col-id="attributes.`Run Name`")', dom)[1:]
    return {re.search(r'class="css-\w+">([^<]+)</span></a>', cell).group(1): cell[:3000] for cell in cells
            if re.search(r'class="css-\w+">([^<]+)</span></a>', cell[:3000])}


@pytest.mark.slow
def test_the_mlflow_ui_opens_on_the_sweeps_nested_runs_with_objective_columns(mlflow_ui, fake_sweeps_store, chromium, tmp_path):
    experiment, parent, trials = runs_of(fake_sweeps_store)
    runs_page = f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs"
    view_page = f"{mlflow_ui}/{sweep_view_url(experiment.experiment_id, SWEEP)}"
    shot = tmp_path / "mlflow-ui.png"
    window = "--window-size=2400,1000"  # wide enough for the metric columns beside the assistant panel
    jobs = {
        "runs": ("--dump-dom", runs_page), "view": ("--dump-dom", view_page), "shot": (f"--screenshot={shot}", view_page),
    }
    results = {name: run_chromium(chromium, tmp_path / f"profile-{name}", f"--virtual-time-budget={UI_WAIT_MS}", window, *args)
               for name, args in jobs.items()}
    assert all(r.returncode == 0 for r in results.values()), {n: r.stderr[-1500:] for n, r in results.items()}

    # The experiment opens on its training runs (not the GenAI traces overview), with its description.
    runs = strip_svg(results["runs"].stdout)
    assert ">Training runs</h2>" in runs
    assert f"<strong>{EXPERIMENT}</strong>: adversarial fine-tuning sweeps" in runs and "How to read the runs." in runs
    # Nesting: the parent row has the expand-children button; its trials are folded under it, not separate rows.
    cells = run_name_cells(runs)
    assert set(cells) == {SWEEP}, sorted(cells)
    assert "runnamecellrenderer" in cells[SWEEP]

    # The sweep's saved view: every trial as a row, the objective as a column with each trial's value.
    view = strip_svg(results["view"].stdout)
    cells = run_name_cells(view)
    assert {t.info.run_name for t in trials} | {SWEEP} == set(cells), sorted(cells)
    assert f'col-id="metrics.`{OBJECTIVE}`"' in view
    shown = re.findall(rf'col-id="metrics.`{re.escape(OBJECTIVE)}`"[^>]*>(?:<[^>]+>)*([0-9.]+)<', view)
    assert sorted(float(v) for v in shown) == sorted(t.data.metrics[OBJECTIVE] for t in trials)

    image = Image.open(shot).convert("RGB")
    assert image.size == (2400, 1000) and len(image.getcolors(maxcolors=1 << 20)) > 50
    if os.environ.get("MAVA_SCREENSHOT_DIR"):  # keep the picture for the docs / the issue note
        image.save(Path(os.environ["MAVA_SCREENSHOT_DIR"]) / "mlflow-ui.png")
