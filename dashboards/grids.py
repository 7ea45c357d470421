"""One-parameter grids (the paper's ablation figures): robust and clean recall against the parameter, over seeds.

A sweep is a one-parameter grid when its finished trials vary in exactly one searched
parameter besides ``seed`` and the training ``eps`` (``search_spaces/ablation-*.yaml``:
N, M, epochs, pgd_steps, ablate, ...); each training eps gets its own figure, as the
paper's MAVA² and MAVA⁴ rows. Then the report draws it as the paper's Figures 3, 4 and 6 do: for
every attack × eps the mean of TR@1 and IR@1 (the paper's Figure 6 "average of IR@1
and TR@1") against the parameter, one line per attack, each point the mean over the
seeds with an error bar of their standard deviation (none with one seed), and the
clean recall in a panel beside it. :func:`grid_rows` gives the same numbers as a table.
Pure functions of MLflow records; nothing is recomputed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from dashboards import page
from dashboards.figures import COLOURS, MARKERS, new_figure, numeric
from dashboards.records import ExperimentRecords, Sweep, Trial
from trainables.names import CLEAN, STATUS_FINISHED

SEED = "seed"
GROUPING = (SEED, "eps")  # replicates (seeds) and the figure-per-value key (training eps) are not the grid's axis
CLEAN_PREFIX = CLEAN  # metrics clean/tr1, clean/ir1


@dataclass(frozen=True)
class GridPoint:
    """One parameter value's mean ± std over seeds of one attack's mean(TR@1, IR@1)."""

    value: str
    series: str  # ``clean`` or an attack × eps prefix, e.g. ``co-attack/eps2``
    mean: float
    std: float | None  # None with a single seed
    seeds: int


def grid_parameter(sweep: Sweep, trials: Sequence[Trial]) -> str | None:
    """The one searched parameter (besides the seed and the training eps) this sweep's finished trials vary, or None."""
    finished = [t for t in trials if t.sweep_id == sweep.sweep_id and t.status == STATUS_FINISHED]
    varied = [key for key in sweep.searched() if key not in GROUPING and len({t.params.get(key) for t in finished}) > 1]
    return varied[0] if len(varied) == 1 else None


def _series(trials: Sequence[Trial]) -> list[str]:
    """Metric prefixes that have both tr1 and ir1 in every trial: clean first, then each attack × eps."""
    prefixes = None
    for trial in trials:
        found = {key.rsplit("/", 1)[0] for key in trial.metrics if key.endswith("/tr1") and f"{key[:-4]}/ir1" in trial.metrics}
        prefixes = found if prefixes is None else prefixes & found
    ordered = sorted(prefixes or ())
    return ([CLEAN_PREFIX] if CLEAN_PREFIX in ordered else []) + [p for p in ordered if p != CLEAN_PREFIX]


def _order(values: set[str]) -> list[str]:
    as_numbers = [numeric(v) for v in values]
    if all(x is not None and math.isfinite(x) for x in as_numbers):
        return sorted(values, key=float)
    return sorted(values)


def grid_rows(trials: Sequence[Trial], parameter: str) -> list[GridPoint]:
    """Per parameter value and series: the mean over seeds of mean(TR@1, IR@1), with the seeds' standard deviation."""
    finished = [t for t in trials if t.status == STATUS_FINISHED and parameter in t.params]
    points = []
    for value in _order({t.params[parameter] for t in finished}):
        group = [t for t in finished if t.params[parameter] == value]
        for series in _series(finished):
            scores = [(t.metrics[f"{series}/tr1"] + t.metrics[f"{series}/ir1"]) / 2 for t in group]
            std = statistics.stdev(scores) if len(scores) > 1 else None
            points.append(GridPoint(value, series, statistics.fmean(scores), std, len(scores)))
    return points


def grid_figure(points: Sequence[GridPoint], parameter: str, title: str) -> Figure:
    """Robust series (left, one line per attack × eps) and clean (right) against the parameter, error bars = std over seeds."""
    figure = new_figure(10, 3.6)
    robust_axes, clean_axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    values = list(dict.fromkeys(p.value for p in points))
    x = list(range(len(values)))
    robust = [s for s in dict.fromkeys(p.series for p in points) if s != CLEAN_PREFIX]
    for axes, names in ((robust_axes, robust), (clean_axes, [CLEAN_PREFIX])):
        for index, series in enumerate(names):
            line = {p.value: p for p in points if p.series == series}
            xs = [i for i, v in zip(x, values) if v in line]
            means = [line[values[i]].mean for i in xs]
            errors = [line[values[i]].std or 0.0 for i in xs]
            axes.errorbar(xs, means, yerr=errors, capsize=3, marker=MARKERS[index % len(MARKERS)],
                          color=COLOURS[index % len(COLOURS)], label=series)
        axes.set_xticks(x, values)
        axes.set(xlabel=parameter, ylabel="mean of TR@1 and IR@1 (%)")
        axes.grid(alpha=0.3)
        if names:
            axes.legend(fontsize=7, loc="best")
    seeds = sorted({p.seeds for p in points})
    robust_axes.set_title(f"under attack (mean ± std over {'/'.join(map(str, seeds))} seed(s))", fontsize=9)
    clean_axes.set_title(CLEAN_PREFIX, fontsize=9)
    figure.suptitle(title, fontsize=10)
    return figure


def grids_section(records: ExperimentRecords, add) -> str:
    """A figure and a table per one-parameter-grid sweep of the experiment ("" when none is one)."""
    parts = []
    for sweep in records.sweeps:
        trials = [t for t in records.trials if t.sweep_id == sweep.sweep_id]
        parameter = grid_parameter(sweep, trials)
        if parameter is None:
            continue
        for eps in sorted({t.eps for t in trials}):
            points = grid_rows([t for t in trials if t.eps == eps], parameter)
            if not points:
                continue
            label = f"sweep {sweep.sweep_id}: {parameter}, training eps {eps}"
            parts.append(page.subheading_html(label))
            parts.append(add(f"grid-{page.slug(sweep.sweep_id)}-eps{page.slug(eps)}", f"{label}: recall against {parameter}",
                             grid_figure(points, parameter, label)))
            rows = [{parameter: p.value, "series": p.series, "mean(TR@1, IR@1)": p.mean,
                     "std over seeds": "-" if p.std is None else f"{p.std:.1f}", "seeds": p.seeds} for p in points]
            parts.append(page.plain_table_html([parameter, "series", "mean(TR@1, IR@1)", "std over seeds", "seeds"], rows, "grid"))
    return "".join(parts)
