"""Dashboards: one self-contained HTML report read from a real tiny sweep's MLflow store, viewed in headless Chromium."""

from __future__ import annotations

import ast
import base64
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import REPO_ROOT, run_chromium
from dashboards.figures import COLOURS, pareto_front
from dashboards.importance import distributions, param_value, sweep_importances
from dashboards.records import Sweep, Trial
from dashboards.report import build_report
from platform.compare import check_tracking_store
from platform.sweep import run_sweep
from platform.sweep_spec import parse_sweep_spec
from platform.tracking import FAILURE_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_TAG
from trainables.errors import UserError

EXPERIMENT = "dash"
OBJECTIVE = "pgd/eps4/tr1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- pure parts (fast)

def make_trial(trial_id: str, params: dict[str, str], value: float, status: str = "FINISHED") -> Trial:
    return Trial(run_id=f"run-{trial_id}", run_name=trial_id, sweep_id="s", trial_id=trial_id, status=status, model="tiny-clip",
                 defense="mava", eps="4/255", params=params, metrics={OBJECTIVE: value, "clean/tr1": 50.0}, checkpoint=None)


SPACE = {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}, "N": {"distribution": "int", "low": 1, "high": 3},
         "eps": {"distribution": "choice", "values": [2 / 255, 4 / 255]}, "M": {"distribution": "fixed", "value": 2}}


def test_the_pareto_front_keeps_exactly_the_undominated_trials():
    points = [(10.0, 1.0), (8.0, 3.0), (9.0, 0.5), (5.0, 3.0), (8.0, 3.0)]
    assert [points[i] for i in pareto_front(points)] == [(8.0, 3.0), (8.0, 3.0), (10.0, 1.0)]


def test_logged_param_strings_map_back_onto_the_sweep_space():
    dists = distributions(SPACE)
    assert "M" not in dists  # fixed keys are not a search dimension
    assert param_value(str(4 / 255), dists["eps"]) == 4 / 255
    assert param_value("2", dists["N"]) == 2 and param_value("0.01", dists["a"]) == 0.01
    assert param_value("0.5", dists["a"]) is None and param_value(str(3 / 255), dists["eps"]) is None


def test_importances_single_out_the_param_that_drives_the_objective():
    points = [(0.001, 1, 2), (0.003, 3, 4), (0.01, 1, 4), (0.03, 2, 2), (0.06, 3, 2), (0.1, 2, 4),
              (0.002, 2, 2), (0.005, 1, 2), (0.02, 3, 4), (0.08, 1, 4)]
    trials = [make_trial(f"t{i}", {"a": str(a), "N": str(n), "eps": str(e / 255)}, value=1000 * a) for i, (a, n, e) in enumerate(points)]
    result = sweep_importances(Sweep("r", "s", SPACE, []), trials, OBJECTIVE)
    assert result.reason is None and result.trials == 10
    assert set(result.values) == {"a", "N", "eps"} and max(result.values, key=result.values.get) == "a"


@pytest.mark.parametrize("values, statuses, reason", [
    ([5.0], ["FINISHED"], "fewer than 10 are noise"),
    ([5.0, 6.0, 7.0, 8.0, 9.0], ["FINISHED"] * 5, "fewer than 10 are noise"),  # varied, but too few to attribute
    ([5.0] * 10, ["FINISHED"] * 10, "constant objective"),
    ([5.0] * 9 + [9.0], ["FINISHED"] * 9 + ["FAILED"], "fewer than 10 are noise"),  # a failed run is not a completed Optuna trial
])
def test_importances_say_why_they_are_not_shown(values, statuses, reason):
    trials = [make_trial(f"t{i}", {"a": str(0.001 * (i + 1)), "N": "1", "eps": str(2 / 255)}, v, s)
              for i, (v, s) in enumerate(zip(values, statuses))]
    result = sweep_importances(Sweep("r", "s", SPACE, []), trials, OBJECTIVE)
    assert result.values == {} and reason in result.reason


def test_a_trial_outside_the_space_is_left_out_with_a_note():
    trials = [make_trial("in1", {"a": "0.01", "N": "1", "eps": str(2 / 255)}, 1.0),
              make_trial("out", {"a": "0.5", "N": "1", "eps": str(2 / 255)}, 2.0)]
    result = sweep_importances(Sweep("r", "s", SPACE, []), trials, OBJECTIVE)
    assert result.trials == 1 and "fewer than 10 are noise" in result.reason
    assert result.notes == ["trial out left out: a=0.5 outside the space"]


def test_a_sweep_whose_trials_all_failed_gets_a_report_that_says_why(tmp_path):
    # Records written with the tags and params platform.tracking gives a sweep whose only trial failed.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("failing", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, tags={ROLE_TAG: "sweep", SWEEP_TAG: "failing-1"})
    client.log_param(parent.info.run_id, "space", json.dumps({"a": SPACE["a"]}))
    client.log_param(parent.info.run_id, "objectives", json.dumps([{"metric": OBJECTIVE, "mode": "max"}]))
    run = client.create_run(experiment_id, tags={ROLE_TAG: "trial", SWEEP_TAG: "failing-1", TRIAL_TAG: "t1", "mava.defense": "mava",
                                                 FAILURE_TAG: "Traceback ...\nNonFiniteLossError: the loss became NaN at epoch 1"})
    client.log_param(run.info.run_id, "a", "0.01")
    client.log_metric(run.info.run_id, "train/l_cms", 0.9, step=1)
    client.set_terminated(run.info.run_id, status="FAILED")

    report = build_report(client, "failing", uri, tmp_path / "r.html")
    text = report.html_path.read_text()
    assert "no trial has finished yet" in text and "importances not shown: 0 completed trial(s)" in text
    assert run.info.run_id in text and "(none: failed: NonFiniteLossError: the loss became NaN at epoch 1)" in text
    assert [p.name for p in report.figure_paths] == [f"curves-{run.info.run_id}.png"]  # the curve it did record


def paper_columns(html: str) -> set[str]:
    return {attrs["data-column"] for row in tables_of(html).get("paper", []) for _, attrs in row if "data-column" in attrs}


def test_a_captioner_report_shows_caption_metrics_and_its_own_objective(fake_sweeps_store, tmp_path):
    report = build_report(MlflowClient(fake_sweeps_store), "captions", fake_sweeps_store, tmp_path / "r.html")
    html = report.html_path.read_text()
    assert report.objective == "clean/cider" and "objective: clean/cider" in html and "robust objective" not in html
    assert paper_columns(html) == {"clean/bleu4", "clean/meteor", "clean/rouge_l", "clean/cider"}
    assert all(f"<th>{label}</th>" in html for label in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")) and "<th>BL@" not in html
    best = [text for row in tables_of(html)["paper"] for text, attrs in row if attrs.get("data-column") == "clean/cider"]
    assert sorted(best) == ["50.0", "80.0"]  # the CIDEr-best trial of each eps group
    assert "no clean-vs-robust trade-off to draw: the 4 finished captioner trial(s) score clean captions only" in html
    names = {path.stem for path in report.figure_paths}
    assert "params" in names and "tradeoff" not in names  # the scatter of clean/cider
    # 4 trials: too few for importances; the reason names the captioner's own objective
    assert "importance-cap-1" not in names and "importances not shown: 4 completed trial(s) with clean/cider" in html
    trials_header = re.search(r'<table class="trials"><thead><tr>(.*?)</tr>', html).group(1)
    assert "clean/cider" in trials_header and "clean/bleu4" in trials_header and "clean/tr1" not in trials_header


def test_a_mixed_report_plots_retrieval_tradeoffs_and_each_sweeps_own_objective(fake_sweeps_store, tmp_path):
    report = build_report(MlflowClient(fake_sweeps_store), "mixed", fake_sweeps_store, tmp_path / "r.html")
    html = report.html_path.read_text()
    assert report.objective == "pgd/eps4/tr1"
    assert {"clean/tr1", "pgd/eps4/tr1", "clean/bleu4", "clean/cider"} <= paper_columns(html)
    assert "by clean/cider for a captioner" in html  # the table says how the captioner rows were chosen
    names = {path.stem for path in report.figure_paths}
    assert {"tradeoff", "params", "params-clean-cider"} <= names and not any(n.startswith("importance-") for n in names)
    assert "The 4 finished captioner trial(s) are not in this figure" in html
    # each sweep's importances are judged on its own objective (and both have too few trials)
    assert re.search(r"importances not shown: \d+ completed trial\(s\) with pgd/eps4/tr1", html)
    assert "importances not shown: 4 completed trial(s) with clean/cider" in html


def test_dashboards_only_read_mlflow():
    """Every MLflow call in dashboards/ (and in the compare rows it reuses) is one of the client's read calls."""
    reads = {"get_experiment_by_name", "search_experiments", "search_runs", "get_run", "get_metric_history", "list_artifacts",
             "download_artifacts"}  # (a copy of a logged artifact, e.g. a trial's example pictures, into a temporary folder)
    seen: set[str] = set()
    for path in [*sorted((REPO_ROOT / "dashboards").glob("*.py")), REPO_ROOT / "platform" / "compare.py",
                 REPO_ROOT / "platform" / "seed_spread.py"]:
        calls = {n.func.attr for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                 and n.func.value.id in {"client", "mlflow", "MlflowClient"}}
        assert calls <= reads, f"{path.name} calls {sorted(calls - reads)} on MLflow"
        seen |= calls
    assert {"search_runs", "get_metric_history", "download_artifacts"} <= seen  # the scan does see the client calls


# ---------------------------------------------------------------- end to end on a real sweep (slow)

@pytest.fixture(scope="module")
def sweep_store(ray_session, random_tiny_clip_weights, tmp_path_factory) -> dict:
    """A real 2-trial, 2-epoch MAVA sweep on random tiny-CLIP weights, recorded in its own MLflow store."""
    root = tmp_path_factory.mktemp("dash-sweep")
    data = {
        "experiment": {"name": EXPERIMENT, "model": f"tiny-clip@{random_tiny_clip_weights}", "train_data": "synthetic:train,n=12",
                       "eval_data": "synthetic:test,n=6", "epochs": 2, "batch_size": 6, "pgd_steps": 1, "eval_eps": ["4/255"],
                       "M": 2},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent_trials": 2},
        "search": {"algorithm": "tpe", "num_trials": 2, "seed": 0, "objectives": [{"metric": OBJECTIVE, "mode": "max"}]},
        "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}, "N": {"distribution": "int", "low": 1, "high": 2}},
        "tracking": {"artifact_location": str(root / "artifacts"), "register_best": False},
    }
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summary = run_sweep(parse_sweep_spec(data, "dash.yaml"), tracking_uri=uri, storage_path=str(root / "ray"))
    assert [r["status"] for r in summary["rows"]] == ["OK", "OK"], summary["rows"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    trials = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    return {"uri": uri, "client": client, "trials": trials, "root": root}


def report_command(uri: str, experiment: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "dashboards.report", "--experiment", experiment, "--tracking-uri", uri, "--out", str(out)]


@pytest.fixture(scope="module")
def report(sweep_store) -> dict:
    out = sweep_store["root"] / "site" / "report.html"
    result = subprocess.run(report_command(sweep_store["uri"], EXPERIMENT, out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {**sweep_store, "out": out, "html": out.read_text(encoding="utf-8"), "files": sorted((out.parent / "report_files").glob("*.png")),
            "printed": result.stdout + result.stderr}


class Tables(HTMLParser):
    """Cells of each ``<table class=...>``: {class: [[(text, attrs), ...] per row]}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, dict]]]] = {}
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("class", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td" and self._table is not None:
            self._cell = ["", attrs]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table[-1].append(tuple(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def tables_of(html: str) -> dict:
    parser = Tables()
    parser.feed(html)
    return parser.tables


@pytest.mark.slow
def test_the_report_names_every_trial_with_its_run_id_and_checkpoint(report):
    assert len(report["trials"]) == 2
    for run in report["trials"]:
        checkpoint = f"{run.info.artifact_uri}/checkpoint/vision.safetensors"
        assert run.info.run_id in report["html"] and checkpoint in report["html"]
        assert Path(checkpoint.removeprefix("file://")).is_file()  # the path shown is the artifact MLflow holds
    rows = [r for r in tables_of(report["html"])["trials"] if r]
    assert sorted(cells[-2][0] for cells in rows) == sorted(r.info.run_id for r in report["trials"])


@pytest.mark.slow
def test_every_figure_is_embedded_as_png_and_written_beside_the_page(report):
    embedded = [base64.b64decode(src) for src in re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report["html"])]
    assert len(embedded) == report["html"].count("<img ")  # no image points anywhere else
    on_disk = [path.read_bytes() for path in report["files"]]
    assert all(png.startswith(PNG_MAGIC) for png in embedded + on_disk)
    assert sorted(embedded) == sorted(on_disk)
    names = {path.stem for path in report["files"]}
    assert {"tradeoff", "params"} | {f"curves-{r.info.run_id}" for r in report["trials"]} <= names
    assert not re.search(r"""(src|href)=["'](https?:)?//""", report["html"]) and "<script" not in report["html"] and "<link" not in report["html"]


@pytest.mark.slow
def test_the_paper_table_shows_mlflow_values_and_bolds_the_best_of_each_column(report):
    rows = [r for r in tables_of(report["html"])["paper"] if r]
    assert rows
    by_run = {r.info.run_id: r for r in report["trials"]}
    best: dict[str, float] = {}
    for cells in rows:
        run = by_run[cells[-2][0]]  # the row's run_id column
        for text, attrs in cells:
            if "data-column" in attrs:
                # One seed per configuration: the MLflow value, then the bootstrap interval over test images.
                value, _, interval = text.partition(" ")
                assert value == f"{run.data.metrics[attrs['data-column']]:.1f}"  # read from MLflow, not recomputed
                low, high = map(float, interval.strip("[]").split(", "))
                assert low <= float(value) <= high
                best[attrs["data-column"]] = max(best.get(attrs["data-column"], float("-inf")), float(value))
    assert {"clean/tr1", "clean/ir1", "pgd/eps4/tr1", "pgd/eps4/ir1"} <= set(best)
    for cells in rows:
        for text, attrs in cells:
            if "data-column" in attrs:
                assert ("best" in attrs.get("class", "")) == (float(text.split(" ")[0]) == best[attrs["data-column"]])


@pytest.mark.slow
def test_the_report_shows_the_best_trials_adversarial_examples_from_its_artifact(report):
    shown = {name.split("-")[1] for name in (path.stem for path in report["files"]) if name.startswith("examples-")}
    assert len(shown) == 1  # one model x defense x eps group: its best trial only
    [run] = [r for r in report["trials"] if r.info.run_id in shown]
    assert run.data.metrics[OBJECTIVE] == max(r.data.metrics[OBJECTIVE] for r in report["trials"])
    logged = {a.path for a in report["client"].list_artifacts(run.info.run_id, "examples")}
    assert {"examples/index.html", "examples/examples.json", "examples/fine-tuned-pgd-eps4-0-delta.png"} <= logged
    assert '<table class="adv-examples">' in report["html"] and "undefended encoder" in report["html"]
    assert "Downloading artifacts" not in report["printed"]  # no MLflow progress bar per downloaded artifact folder


@pytest.mark.slow
def test_importances_are_drawn_or_the_page_says_why_not(report):
    # Two trials: far too few for importances, whatever their values; the page says so and draws no bars.
    assert not any(path.stem.startswith("importance-") for path in report["files"])
    assert "importances not shown" in report["html"] and "fewer than 10 are noise" in report["html"]


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium(report, chromium, tmp_path):
    url = report["out"].resolve().as_uri()
    dom = run_chromium(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert '<table class="paper">' in dom.stdout and '<table class="trials">' in dom.stdout
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom.stdout)) == len(report["files"])
    shot = tmp_path / "shot.png"
    result = run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,3000", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100  # text, tables and plots, not a blank page
    blue = np.array([int(COLOURS[0][i:i + 2], 16) for i in (1, 3, 5)])  # the plots' first colour: the PNGs were decoded and drawn
    near_blue = (np.abs(np.asarray(image, dtype=int) - blue) <= 12).all(axis=-1)
    assert near_blue.sum() > 200


def test_a_missing_sqlite_store_is_a_user_error_and_is_not_created(tmp_path):
    absent = tmp_path / "absent.db"
    with pytest.raises(UserError, match="no MLflow database at .*absent.db: run a sweep here first or pass --tracking-uri"):
        check_tracking_store(f"sqlite:///{absent}")
    assert not absent.exists()  # MLflow would have created an empty store; a report never does


@pytest.mark.slow
def test_an_empty_or_missing_experiment_exits_2_with_one_message_and_no_traceback(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    cases = {
        "empty": ("empty", ("experiment 'empty' has no trial runs", "run a sweep into it first")),
        "missing": ("nope", ("no MLflow experiment named 'nope'", "existing experiments:", "empty", "pass one of them as --experiment")),
    }
    # Started together: each run pays the same interpreter and import start-up, and two cores overlap them.
    running = {name: subprocess.Popen(report_command(uri, experiment, tmp_path / f"{name}.html"), cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (experiment, _) in cases.items()}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (name, stdout, stderr)
        assert "Traceback" not in stdout + stderr, (name, stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and all(part in errors[0] for part in cases[name][1]), (name, stderr)
        assert not (tmp_path / f"{name}.html").exists()


def test_each_column_group_states_its_threat_model_and_scoring(fake_sweeps_store, tmp_path):
    html = build_report(MlflowClient(fake_sweeps_store), "mixed", fake_sweeps_store, tmp_path / "r.html").html_path.read_text()
    header = re.search(r'<table class="paper"><thead>(.*?)</thead>', html, re.S).group(1)
    notes = dict(re.findall(r'<th colspan="\d+">([^<]+)<br><span class="group-note">([^<]+)</span></th>', header))
    # The tiny-CLIP retrieval rows rank by cosine; the captioner's caption metrics have no scoring.
    assert notes["clean"] == "no attack; scoring: itc"
    assert notes["pgd eps 4/255"] == "white-box on the row&#x27;s encoder; image ℓ∞ ≤ 4/255, text untouched; scoring: itc"
    assert '<th rowspan="2">scoring</th>' in header
    rows = tables_of(html)["paper"]
    assert sorted(cells[5][0] for cells in rows if cells) == ["-", "-", "itc"]  # the captioner rows (2 eps), the retrieval row


def test_a_multimodal_group_names_its_word_source_and_mixed_scorings_point_to_the_column():
    from dashboards.column_notes import group_notes

    notes = group_notes(["clean/tr1", "sga/eps2/tr1", "sga/eps2/ir1", "clean/acc"], {"mlm:/models/bert-base-uncased", "tiny-mlm"},
                        {"itc", "itc+itm@128"})
    assert notes == {"clean": "no attack; scoring: per row (the scoring column)",
                     "sga/eps2": "white-box on the row's encoder; image ℓ∞ ≤ 2/255 + caption words from mlm:bert-base-uncased, "
                                 "tiny-mlm; scoring: per row (the scoring column)"}


@pytest.mark.parametrize("epochs", [1, 3, 20])
def test_learning_curves_tick_whole_epochs_only(epochs):
    from dashboards.figures import curves_figure
    from dashboards.records import Trial

    history = {"train/loss": [(e, 1.0 / e) for e in range(1, epochs + 1)], "clean/tr1": [(e, 40.0 + e) for e in range(1, epochs + 1)]}
    trial = Trial(run_id="r", run_name="n", sweep_id="s", trial_id="t", status="FINISHED", model="tiny-clip", defense="mava",
                  eps="2/255", params={}, metrics={}, checkpoint=None, history=history)
    figure = curves_figure(trial, ["train/loss"], ["clean/tr1"])
    figure.canvas.draw()
    for axes in figure.axes:
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # never 1.5, nor 0.96 .. 1.04 around one epoch
