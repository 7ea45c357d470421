"""How sure each cell of the comparison table is: its spread over seeds and its bootstrap interval over test images.

A *configuration* is the trials of a group that share every recorded param but
``seed`` (``search.seeds`` runs each point once per seed). A cell of the table is
the mean of the configuration's seeds; beside it, the sample standard deviation
over those seeds and, for TR@1/IR@1 cells, the percentile bootstrap 95% interval
of that seed-mean over the test images, computed from the ranks each trial's final
evaluation uploaded (``checkpoint/eval_ranks.parquet``; the procedure is in
``trainables/evaluation/uncertainty.py``). Reads MLflow only.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from platform.mlflow_downloads import quiet_downloads
from trainables.evaluation.uncertainty import IR, TR, QueryRanks, bootstrap_recall_interval, mean_std, read_ranks
from trainables.names import CHECKPOINT_ARTIFACT_DIR, CLEAN, RANKS_FILE

SEED_PARAM = "seed"  # TrainConfig.seed, the param that tells a configuration's trials apart
# clean/tr1, pgd/eps4/ir1, ...: a recall cell whose interval the ranks give (K from the key).
RECALL_CELL = re.compile(rf"^(?:(?P<unattacked>{CLEAN})|(?P<attack>[a-z0-9-]+)/eps(?P<eps>[0-9.]+))/(?P<direction>tr|ir)(?P<k>[0-9]+)$")


@dataclass(frozen=True)
class Spread:
    """What is known of a cell's uncertainty: its seeds' standard deviation and its bootstrap interval over test images."""

    seeds: int  # trials averaged in the cell
    std: float | None  # sample standard deviation over the seeds; None with one seed
    interval: tuple[float, float] | None  # 95% over test images; None when a seed uploaded no ranks (or not a recall cell)


def configurations(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by every param but ``seed``, in order of first appearance."""
    found: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.data.params.items() if k != SEED_PARAM))
        found.setdefault(key, []).append(run)
    return list(found.values())


def seed_mean(runs: list[Run], metric: str) -> float | None:
    """The metric's mean over the runs that record it (None: none does)."""
    values = [run.data.metrics[metric] for run in runs if metric in run.data.metrics]
    return mean_std(values)[0] if values else None


def download_ranks(client: MlflowClient, run: Run) -> dict[tuple[str, float | None], QueryRanks] | None:
    """The ranks a trial's final evaluation uploaded beside its checkpoint, or None (not recorded)."""
    listed = {item.path for item in client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT_DIR)}
    if f"{CHECKPOINT_ARTIFACT_DIR}/{RANKS_FILE}" not in listed:
        return None
    with tempfile.TemporaryDirectory() as folder, quiet_downloads():
        path = client.download_artifacts(run.info.run_id, f"{CHECKPOINT_ARTIFACT_DIR}/{RANKS_FILE}", folder)
        return read_ranks(Path(path))


def ranks_of_cell(ranks: dict[tuple[str, float | None], QueryRanks], attack: str, eps_255: float | None) -> QueryRanks | None:
    for (found_attack, found_eps), query_ranks in ranks.items():
        same_eps = (found_eps is None) if eps_255 is None else (found_eps is not None and abs(found_eps * 255 - eps_255) < 1e-6)
        if found_attack == attack and same_eps:
            return query_ranks
    return None


def cell_spreads(client: MlflowClient, runs: list[Run], columns: list[str]) -> dict[str, Spread]:
    """Each column's :class:`Spread` over the configuration's ``runs`` (one per seed)."""
    ranks = [download_ranks(client, run) for run in runs]
    spreads = {}
    for column in columns:
        values = [run.data.metrics[column] for run in runs if column in run.data.metrics]
        if not values:
            continue
        interval = None
        match = RECALL_CELL.match(column)
        if match and len(values) == len(runs) and all(r is not None for r in ranks):
            attack, eps_255 = (CLEAN, None) if match["unattacked"] else (match["attack"], float(match["eps"]))
            per_seed = [ranks_of_cell(r, attack, eps_255) for r in ranks]
            if all(p is not None for p in per_seed):
                interval = bootstrap_recall_interval(per_seed, TR if match["direction"] == "tr" else IR, int(match["k"]))
        spreads[column] = Spread(seeds=len(values), std=mean_std(values)[1], interval=interval)
    return spreads


def cell_text(mean: float | None, spread: Spread | None) -> str:
    """``45.2 ± 1.3 [41.0, 49.4]``: seed mean ± seed standard deviation [bootstrap 95% over test images]; parts unknown left out."""
    if mean is None:
        return "-"
    text = f"{mean:.1f}"
    if spread is not None and spread.std is not None:
        text += f" ± {spread.std:.1f}"
    if spread is not None and spread.interval is not None:
        text += f" [{spread.interval[0]:.1f}, {spread.interval[1]:.1f}]"
    return text
