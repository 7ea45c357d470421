"""One HTML report of a sweep experiment: ``python -m dashboards.report --experiment NAME --out report.html``.

The page holds the paper-style table (model × defense × eps; clean and every
attack × eps TR@1/IR@1, a captioner's BLEU-4/METEOR/ROUGE-L/CIDEr, best per column
in bold; each cell the mean ± std over seeds with a bootstrap 95% interval over test images), the clean-vs-robust trade-off with its Pareto front, Optuna's
hyperparameter importances and a scatter of every searched param against the
objective (robust recall; a captioner sweep's own, ``clean/cider``), a table of
every trial (MLflow run id, checkpoint artifact), each group's best trial's
adversarial-example pictures (its ``examples/`` artifact) and each trial's per-epoch
learning curves. Figures are embedded (base64 PNG) and also written beside the
page, in ``<out>_files/``. Reads MLflow only; never recomputes a metric.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dashboards import figures, page
from dashboards.column_notes import SCORING_COLUMN, group_notes
from dashboards.examples_section import examples_section
from dashboards.grids import grids_section
from dashboards.page import FigureFile
from dashboards.importance import EVALUATORS, sweep_importances
from dashboards.records import (CLEAN_TR1, ExperimentRecords, Trial, curve_metrics, default_objective, load_records,
                                objective_mode, sweep_objective)
from platform.cli import run_cli
from platform.compare import CAPTION_RANK, check_tracking_store, comparison_rows, is_caption_metric
from trainables.errors import UserError
from trainables.tasks import Task

TEXT_COLUMNS = ["model", "defense", "eps", "trials", "seeds"]
TAIL_COLUMNS = ["run_id", "checkpoint"]
AddFigure = Callable[[str, str, Figure], str]  # (file stem, title, figure) -> its <figure> HTML


@dataclass(frozen=True)
class Report:
    html_path: Path
    figure_paths: list[Path]
    objective: str | None


def paper_section(client: MlflowClient, records: ExperimentRecords, robust: str | None) -> str:
    if not records.finished():
        return page.reason_html("no trial has finished yet, so there is no final row per model × defense × eps; "
                                "the trials table below lists the runs and their status")
    columns, rows = comparison_rows(client, records.name, rank_by=robust)
    trials = {t.run_id: t for t in records.trials}
    for row in rows:
        row["model"] = figures.short_model(row["model"])
        row["checkpoint"] = trials[row["run_id"]].checkpoint
        row[SCORING_COLUMN] = trials[row["run_id"]].scoring
    metrics = [c for c in columns if c not in TEXT_COLUMNS and c not in TAIL_COLUMNS]
    best_runs = [trials[row["run_id"]] for row in rows]
    notes = group_notes(metrics, {t.params["word_candidates"] for t in best_runs if "word_candidates" in t.params},
                        {t.scoring for t in best_runs if t.scoring})
    text_columns = TEXT_COLUMNS + ([SCORING_COLUMN] if any(t.scoring for t in best_runs) else [])
    ranked = robust or "the last robust TR@1 column"
    if any(is_caption_metric(m) for m in metrics) and ranked != CAPTION_RANK:
        ranked += f" (a row that does not record it: by {CAPTION_RANK} for a captioner, the last robust TR@1 column otherwise)"
    return (page.note_html(f"Each row is the best configuration of its model × defense × training eps by {ranked} (its finished "
                           "trials that differ only in seed, ranked by their mean); a cell reads mean ± standard deviation over "
                           "the seeds, then [the bootstrap 95% interval over test images] for TR@1/IR@1 (1000 resamples of the "
                           "images, a caption with its image; docs/dashboards.md); the best mean of each column is in bold. "
                           "Under each column group: its threat model (every evaluation attacks the row's own encoder, "
                           "white-box) and, for recall, how candidates were scored.")
            + page.paper_table_html(text_columns, metrics, TAIL_COLUMNS, rows, notes))


def trials_section(records: ExperimentRecords, robust: str | None) -> str:
    params = [k for k in records.searched_params() if k != "eps"]  # the eps column already shows it, in /255
    metrics = list(dict.fromkeys(m for m in (*_trial_recall(records), robust, *_trial_captions(records)) if m))
    rows = []
    for t in records.trials:
        row = {"trial": t.trial_id, "sweep": t.sweep_id, "status": t.status, "defense": t.defense, "eps": t.eps}  # eps as tagged: x/255
        row.update({k: _param_cell(k, t.params.get(k)) for k in params})
        row.update({m: t.metrics.get(m) for m in metrics})
        missing = f"(none: failed: {t.failure})" if t.failure else f"(none: the trial is {t.status.lower()})"
        row.update({"run_id": t.run_id, "checkpoint": t.checkpoint or missing})
        rows.append(row)
    columns = ["trial", "sweep", "status", "defense", "eps", *params, *metrics, "run_id", "checkpoint"]
    return page.plain_table_html(columns, rows, "trials", path_columns=("run_id", "checkpoint"))


def _trial_recall(records: ExperimentRecords) -> tuple[str, ...]:
    # Clean recall columns, as always, unless every recorded metric is a captioner's (they would be all dashes).
    names = records.metric_names()
    captioners_only = any(is_caption_metric(m) for m in names) and not any(m in names for m in (CLEAN_TR1, "clean/ir1"))
    return () if captioners_only else (CLEAN_TR1, "clean/ir1")


def _trial_captions(records: ExperimentRecords) -> list[str]:
    names = records.metric_names()
    return [m for m in ("clean/bleu4", CAPTION_RANK) if m in names]


def _param_cell(key: str, raw: str | None) -> str:
    value = figures.numeric(raw)
    if value is None:
        return "-" if raw is None else raw
    return f"{value * 255:.3g}/255" if key == "eps" else f"{value:.4g}"


def build_report(client: MlflowClient, experiment: str, tracking_uri: str, out: Path, objective: str | None = None,
                 evaluator: str = "fanova") -> Report:
    """Read the experiment, draw every figure, write ``out`` and ``<out>_files/*.png``."""
    records = load_records(client, experiment, tracking_uri)
    available = sorted(records.metric_names())
    if objective is not None and objective not in available:
        raise UserError(f"--objective {objective!r} is not a metric of experiment {experiment!r}: choose one of {', '.join(available)}")
    robust = objective or default_objective(records)
    made: list[FigureFile] = []

    def add(name: str, title: str, figure: Figure) -> str:
        made.append(FigureFile(name, title, figures.png_bytes(figure)))
        return page.figure_html(made[-1])

    def embed(name: str, png: bytes) -> str:  # a picture a trial logged, not drawn here
        made.append(FigureFile(name, name, png))
        return page.data_uri(png)

    finished = records.finished()
    sections = [("table", "Paper-style table", paper_section(client, records, robust))]
    sections.append(("tradeoff", "Clean vs robust trade-off", _tradeoff_section(finished, robust, add)))
    sections.append(("params", "Hyperparameters", _params_section(records, robust, evaluator, add)))
    grids = grids_section(records, add)
    if grids:
        sections.append(("grids", "Parameter grids", grids))
    sections.append(("trials", "Trials", trials_section(records, robust)))
    sections.append(("adversarial-examples", "Adversarial examples", examples_section(client, records, robust, embed)))
    curves = []
    for trial in records.trials:
        losses, evals = curve_metrics(set(trial.history))
        curves.append(add(f"curves-{trial.run_id}", f"learning curves of trial {trial.trial_id}", figures.curves_figure(trial, losses, evals)))
    sections.append(("curves", "Learning curves", "\n".join(curves)))
    meta = [f"tracking URI: {tracking_uri}", f"generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"{len(records.sweeps)} sweep(s), {len(records.trials)} trial run(s), {len(finished)} finished",
            f"{_objective_label(robust)}: {robust or '(none recorded)'}"]
    return _write(out, page.document(f"Sweep report: {experiment}", sections, meta), made, robust)


def _objective_label(objective: str | None) -> str:
    return "objective" if objective and is_caption_metric(objective) else "robust objective"


def _tradeoff_section(finished: list[Trial], robust: str | None, add: AddFigure) -> str:
    """The clean-vs-robust figure of the retrieval trials: a captioner's sweep scores clean captions only."""
    captioners = len([t for t in finished if t.task is Task.CAPTIONING])
    clean_only = "score clean captions only (robust captioning is measured afterwards, with python -m platform.evaluate_captions)"
    if not (robust and any(CLEAN_TR1 in t.metrics and robust in t.metrics for t in finished)):
        if captioners:
            return page.reason_html(f"no clean-vs-robust trade-off to draw: the {captioners} finished captioner trial(s) {clean_only}")
        return page.reason_html(f"no finished trial has both {CLEAN_TR1} and a robust recall metric to plot against it")
    figure = add("tradeoff", f"{CLEAN_TR1} vs {robust}", figures.tradeoff_figure(finished, robust))
    if captioners:
        figure += page.note_html(f"The {captioners} finished captioner trial(s) are not in this figure: they {clean_only}.")
    return figure


def _params_section(records: ExperimentRecords, robust: str | None, evaluator: str, add: AddFigure) -> str:
    if robust is None:
        return page.reason_html("no robust recall or caption metric was recorded, so there is nothing to attribute to the parameters")
    parts = []
    for sweep in records.sweeps:
        metric = sweep_objective(sweep, records.trials, robust)
        result = sweep_importances(sweep, records.trials, metric, objective_mode(records, metric), evaluator)
        heading = page.subheading_html(f"Importances ({evaluator}) for sweep {sweep.sweep_id}")
        body = (add(f"importance-{page.slug(sweep.sweep_id)}", f"importances in sweep {sweep.sweep_id}", figures.importance_figure(result))
                if result.values else page.reason_html(f"importances not shown: {result.reason}"))
        parts.append(heading + body + "".join(page.note_html(n) for n in result.notes))
    if not records.sweeps:
        parts.append(page.reason_html("importances not shown: no parent sweep run (with the searched space) in this experiment"))
    metrics = dict.fromkeys([robust, *(sweep_objective(s, records.trials, robust) for s in records.sweeps)])
    parts += [_params_scatter(records, metric, "params" if metric == robust else f"params-{page.slug(metric)}", add) for metric in metrics]
    return "\n".join(parts)


def _params_scatter(records: ExperimentRecords, metric: str, name: str, add: AddFigure) -> str:
    scored = [t for t in records.finished() if metric in t.metrics]
    params = records.searched_params(scored)
    if not (params and scored):
        return page.reason_html(f"no searched parameter, or no finished trial with {metric}, to plot")
    log_params = {k for s in records.sweeps for k, d in s.space.items() if d.get("distribution") == "loguniform"}
    return add(name, f"searched params vs {metric}", figures.params_figure(scored, params, metric, log_params))


def _write(out: Path, text: str, made: list[FigureFile], robust: str | None) -> Report:
    folder = out.parent / f"{out.stem}_files"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):  # an older report's figure must not pass for one of this report
            stale.unlink()
        paths = []
        for figure in made:
            paths.append(folder / f"{figure.name}.png")
            paths[-1].write_bytes(figure.png)
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot write the report to {out} ({error.strerror}): choose a writable --out") from None
    return Report(out, paths, robust)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment of the sweep file)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded sqlite:///mlflow.db)")
    parser.add_argument("--out", default="report.html", help="HTML file to write; figures go to <out stem>_files/ beside it")
    parser.add_argument("--objective", help="robust metric for the trade-off, importances and scatter plots (default: the "
                                            "sweep's first robust objective, e.g. pgd/eps4/tr1; clean/cider for captioner sweeps)")
    parser.add_argument("--importance", choices=sorted(EVALUATORS), default="fanova", help="Optuna importance evaluator (default: fanova)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory studies' creation notices are noise here
    check_tracking_store(args.tracking_uri)
    try:
        report = build_report(MlflowClient(args.tracking_uri), args.experiment, args.tracking_uri, Path(args.out), args.objective, args.importance)
    except MlflowException as error:  # e.g. a file that is not an MLflow database, a server that refuses the request
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UserError(f"cannot read MLflow at {args.tracking_uri} ({first_line}): check --tracking-uri") from None
    print(f"wrote {report.html_path} ({len(report.figure_paths)} figures, also in {report.html_path.parent / (report.html_path.stem + '_files')})")
    return 0


if __name__ == "__main__":
    run_cli(main)
