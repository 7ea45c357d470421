"""Paper-style comparison table from MLflow: ``python -m platform.compare --experiment NAME``.

Rows: model × defense × training eps: the best configuration of each group by
``--rank-by`` (trials sharing every param but ``seed`` form one configuration,
ranked by their mean over seeds); columns: clean TR@1/IR@1 and every attack × eps TR@1/IR@1 found in
the runs, then, for captioners (``hf-blip-cap``), clean BLEU-4, METEOR (with Java),
ROUGE-L, CIDEr (SPICE with its jars) and any attack × eps of them. An experiment
mixing both has the union of the columns; a row lacks the other kind's cells.
By default a retrieval group is ranked by the last robust TR@1 column (else clean
TR@1) and a captioner group by ``clean/cider``, the objective its sweeps optimise.
``--by PARAM`` splits every group by that param's value: one row per point of a grid
(``--by N`` for ``ablation-neighbours.yaml``): the TR@1 and IR@1 whose mean the report's grid figure draws.
A cell is the configuration's mean over its seeds, printed ``mean ± std [low, high]``:
the standard deviation over seeds (with two seeds or more) and, for recall cells,
the bootstrap 95% interval over test images from the ranks each trial uploaded
(``platform/seed_spread.py``). Reads MLflow only; it never recomputes a metric.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

from mlflow.entities import Experiment
from mlflow.tracking import MlflowClient

from platform.cli import run_cli
from platform.seed_spread import cell_spreads, cell_text, configurations, seed_mean
from trainables.errors import UserError
from trainables.names import CLEAN, DEFENSE_TAG, EPS_TAG, MODEL_TAG, ROLE_TAG, ROLE_TRIAL, STATUS_FINISHED, TASK_TAG, metric_name
from trainables.tasks import Task, task_info, task_of_metrics

GROUP_TAGS = (MODEL_TAG, DEFENSE_TAG, EPS_TAG)
RECALL_TABLE_KEYS = task_info(Task.RETRIEVAL).table_keys
CAPTION_TABLE_KEYS = task_info(Task.CAPTIONING).table_keys
GROUNDING_TABLE_KEYS = task_info(Task.GROUNDING).table_keys
ENTAILMENT_TABLE_KEYS = task_info(Task.ENTAILMENT).table_keys
# What a captioner sweep optimises (search_spaces/paper-blip-captioning.yaml): the captioning task's rank key.
CAPTION_RANK = metric_name(CLEAN, None, task_info(Task.CAPTIONING).rank_key)


def _attack_metric(keys: tuple[str, ...]) -> re.Pattern:
    return re.compile(rf"^(?P<attack>[a-z0-9-]+)/eps(?P<eps>[0-9.]+)/(?P<key>{'|'.join(keys)})$")


ATTACK_METRIC = _attack_metric(RECALL_TABLE_KEYS)
ATTACK_CAPTION_METRIC = _attack_metric(CAPTION_TABLE_KEYS)
ATTACK_GROUNDING_METRIC = _attack_metric(GROUNDING_TABLE_KEYS)
ATTACK_ENTAILMENT_METRIC = _attack_metric(ENTAILMENT_TABLE_KEYS)


def _table_columns(metric_names: set[str], keys: tuple[str, ...], pattern: re.Pattern) -> list[str]:
    """``clean/<key>`` for each key, then each attack × eps (sorted by attack, then eps) and its keys, if recorded."""
    found = [pattern.match(name) for name in metric_names]
    pairs = sorted({(m["attack"], float(m["eps"])) for m in found if m})
    columns = [c for c in (f"{CLEAN}/{key}" for key in keys) if c in metric_names]
    for attack, eps in pairs:
        columns += [c for c in (f"{attack}/eps{eps:g}/{key}" for key in keys) if c in metric_names]
    return columns


def recall_columns(metric_names: set[str]) -> list[str]:
    """``clean/tr1, clean/ir1`` then each attack × eps (sorted by attack, then eps) TR@1 and IR@1."""
    return _table_columns(metric_names, RECALL_TABLE_KEYS, ATTACK_METRIC)


def caption_columns(metric_names: set[str]) -> list[str]:
    """``clean/bleu4, clean/meteor, clean/rouge_l, clean/cider, clean/spice`` (those recorded), then each attack × eps of them."""
    return _table_columns(metric_names, CAPTION_TABLE_KEYS, ATTACK_CAPTION_METRIC)


def grounding_columns(metric_names: set[str]) -> list[str]:
    """``clean/acc, clean/acc_val, ...`` (those recorded), then each attack × eps of them (docs/grounding.md)."""
    return _table_columns(metric_names, GROUNDING_TABLE_KEYS, ATTACK_GROUNDING_METRIC)
def entailment_columns(metric_names: set[str]) -> list[str]:
    """``clean/acc`` then each attack × eps accuracy (visual entailment), those recorded."""
    return _table_columns(metric_names, ENTAILMENT_TABLE_KEYS, ATTACK_ENTAILMENT_METRIC)


def is_caption_metric(name: str) -> bool:
    """``clean/cider``, ``pgd/eps2/bleu4``, ...: a metric only the captioning task's evaluation records."""
    return task_info(Task.CAPTIONING).owns_metric(name)


def group_task(tags: list[dict[str, str]], metric_names: set[str]) -> Task:
    """The task of a group of trial runs: their ``mava.task`` tag, or (runs recorded before it) the task of their metrics."""
    recorded = {t[TASK_TAG] for t in tags if TASK_TAG in t}
    return Task(recorded.pop()) if len(recorded) == 1 else task_of_metrics(metric_names)


def rank_metric(metric_names: set[str], rank_by: str | None, recall_default: str, task: Task | None = None) -> str:
    """The metric that picks a group's trial, given the metrics its trials recorded and their task.

    ``rank_by`` where the group records it; otherwise the task's rank key (``clean/cider`` for
    captioning) and ``recall_default`` for retrieval. In an experiment mixing both, a recall
    ``--rank-by`` means nothing to the captioner rows, nor ``clean/cider`` to the retrieval rows.
    """
    if rank_by in metric_names:
        return rank_by
    rank_key = task_info(task or task_of_metrics(metric_names)).rank_key
    return recall_default if rank_key is None else metric_name(CLEAN, None, rank_key)


def check_tracking_store(uri: str) -> None:
    """A SQLite store that does not exist is a typo, not an empty store (MLflow would silently create it)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])  # relative, or absolute for sqlite:////abs/path
        if not path.is_file():
            raise UserError(f"no MLflow database at {path.resolve()}: run a sweep here first or pass --tracking-uri")


def find_experiment(client: MlflowClient, experiment_name: str) -> Experiment:
    """The named experiment, or a UserError listing the experiments that do exist."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"no MLflow experiment named {experiment_name!r} at this tracking URI: existing experiments: {names}; "
                        "pass one of them as --experiment, or --tracking-uri of the store the sweep wrote to")
    return experiment


def comparison_rows(client: MlflowClient, experiment_name: str, rank_by: str | None = None,
                    by: str | None = None) -> tuple[list[str], list[dict]]:
    """One row per model × defense × eps: the group's best configuration by :func:`rank_metric`; returns (columns, rows).

    A metric cell is the configuration's mean over its seeds; ``row["spread"]`` maps each cell to its
    :class:`~platform.seed_spread.Spread`; ``seeds`` counts the configuration's trials; ``run_id`` is its
    best seed's run (by the same metric), the checkpoint to use. With ``by`` (a param, e.g. ``N`` of
    ``ablation-neighbours.yaml``) every value of that param is a group of its own: a grid's points.
    """
    experiment = find_experiment(client, experiment_name)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}' and attributes.status = '{STATUS_FINISHED}'")
    if not runs:
        raise UserError(f"experiment {experiment_name!r} has no finished trial runs yet: run a sweep first (python -m platform.sweep --space ...)")
    metric_names = {name for run in runs for name in run.data.metrics}
    recall = recall_columns(metric_names)
    # Entailment and grounding share the key ``acc`` (clean/acc): one column each, in order of first appearance.
    columns = list(dict.fromkeys(recall + caption_columns(metric_names) + grounding_columns(metric_names)
                                 + entailment_columns(metric_names)))
    robust = [c for c in recall if not c.startswith(f"{CLEAN}/") and c.endswith("/tr1")]
    recall_default = robust[-1] if robust else f"{CLEAN}/tr1"
    if by is not None and not any(by in run.data.params for run in runs):
        known = sorted({key for run in runs for key in run.data.params})
        raise UserError(f"--by {by}: no trial of experiment {experiment_name!r} has a param {by!r}; its trials' params are {', '.join(known)}")
    groups: dict[tuple, list] = {}
    for run in runs:
        key = tuple(run.data.tags.get(t, "?") for t in GROUP_TAGS) + ((run.data.params.get(by, "-"),) if by else ())
        groups.setdefault(key, []).append(run)
    rows = []
    for key, members in sorted(groups.items(), key=lambda item: tuple(map(_sort_key, item[0]))):
        names = {name for run in members for name in run.data.metrics}
        metric = rank_metric(names, rank_by, recall_default, group_task([run.data.tags for run in members], names))
        configuration = max(configurations(members), key=lambda runs: _or_lowest(seed_mean(runs, metric)))
        best = max(configuration, key=lambda r: r.data.metrics.get(metric, float("-inf")))
        row = dict(zip(("model", "defense", "eps", by), key)) | {"trials": len(members), "seeds": len(configuration)}
        row.update({c: seed_mean(configuration, c) for c in columns})
        row["run_id"] = best.info.run_id
        row["spread"] = cell_spreads(client, configuration, columns)
        rows.append(row)
    return ["model", "defense", "eps", *([by] if by else []), "trials", "seeds", *columns, "run_id"], rows


def _sort_key(value: str) -> tuple:
    """Numbers in numeric order (N = 2 before N = 10), then text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _or_lowest(value: float | None) -> float:
    return float("-inf") if value is None else value


def markdown(columns: list[str], rows: list[dict]) -> str:
    """The table; a metric cell reads ``mean ± std [low, high]`` (seeds' spread, bootstrap 95% over test images)."""
    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        if isinstance(value, float):
            return cell_text(value, row.get("spread", {}).get(column))
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_rows(columns: list[str], rows: list[dict]) -> tuple[list[str], list[dict]]:
    """The table with, after each metric column, ``<column> std``, ``<column> ci_low``, ``<column> ci_high``."""
    metric_columns = [c for c in columns if "/" in c]
    header = [name for c in columns for name in ([c, f"{c} std", f"{c} ci_low", f"{c} ci_high"] if c in metric_columns else [c])]
    flat = []
    for row in rows:
        out = {c: row.get(c) for c in columns}
        for c in metric_columns:
            spread = row.get("spread", {}).get(c)
            out[f"{c} std"] = spread.std if spread else None
            out[f"{c} ci_low"], out[f"{c} ci_high"] = spread.interval if spread and spread.interval else (None, None)
        flat.append(out)
    return header, flat


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m platform.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment of the sweep file)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: the embedded store)")
    parser.add_argument("--rank-by", help="metric choosing each group's trial; a group that does not record it falls back to "
                                          "the default: the last robust TR@1 column, or clean/cider for a captioner group")
    parser.add_argument("--by", metavar="PARAM", help="one row per value of this param (a grid's points, e.g. --by N for "
                                                       "ablation-neighbours.yaml), each still the mean over its seeds")
    parser.add_argument("--csv", help="also write the table as CSV here")
    parser.add_argument("--markdown", help="also write the table as Markdown here")
    args = parser.parse_args()
    check_tracking_store(args.tracking_uri)
    columns, rows = comparison_rows(MlflowClient(args.tracking_uri), args.experiment, args.rank_by, args.by)
    text = markdown(columns, rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.csv:
        header, flat = csv_rows(columns, rows)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(flat)
    return 0


if __name__ == "__main__":
    run_cli(main)
