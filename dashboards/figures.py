"""The report's figures, drawn with matplotlib's Agg canvas from MLflow records (no metric is recomputed).

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas
rather than through ``pyplot``: no global backend or figure registry is touched,
so a report can be built inside any process (a notebook, a test) without a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullFormatter

from dashboards.importance import Importances
from dashboards.records import CLEAN_TR1, Trial
from platform.compare import is_caption_metric
from trainables.names import EPOCH, GRADNORM_KEYS, train_metric

DPI = 90
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def short_model(spec: str) -> str:
    """``tiny-clip@/long/path/w.safetensors -> tiny-clip@w.safetensors``: legends name the weights, not the directory."""
    if "@" in spec:
        name, path = spec.split("@", 1)
        return f"{name}@{path.rstrip('/').rsplit('/', 1)[-1]}"
    if ":/" in spec:
        kind, path = spec.split(":", 1)
        return f"{kind}:{path.rstrip('/').rsplit('/', 1)[-1]}"
    return spec


def group_styles(trials: Sequence[Trial]) -> dict[tuple[str, str], dict]:
    """Colour per model, marker per defense, stable across every figure of a report."""
    models = sorted({t.model for t in trials})
    defenses = sorted({t.defense for t in trials})
    return {(m, d): {"color": COLOURS[models.index(m) % len(COLOURS)], "marker": MARKERS[defenses.index(d) % len(MARKERS)],
                     "label": f"{short_model(m)} / {d}"}
            for m in models for d in defenses}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both higher-is-better), by increasing x."""
    def dominated(i: int) -> bool:
        x, y = points[i]
        return any(px >= x and py >= y and (px > x or py > y) for px, py in points)

    return sorted((i for i in range(len(points)) if not dominated(i)), key=lambda i: points[i])


def tradeoff_figure(trials: Sequence[Trial], robust: str) -> Figure:
    """Every trial at (clean TR@1, robust recall); the Pareto front drawn and its trials labelled."""
    scored = [t for t in trials if CLEAN_TR1 in t.metrics and robust in t.metrics]
    points = [(t.metrics[CLEAN_TR1], t.metrics[robust]) for t in scored]
    styles = group_styles(scored)
    figure = new_figure(8, 5.5)
    axes = figure.subplots()
    for group, style in styles.items():
        members = [p for t, p in zip(scored, points) if t.group == group]
        if members:
            axes.scatter(*zip(*members), s=60, alpha=0.85, color=style["color"], marker=style["marker"], label=style["label"])
    front = pareto_front(points)
    if front:
        axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="#444", lw=1.2, label="Pareto front")
        labels: dict[tuple[float, float], list[str]] = {}
        for i in front:  # trials often tie on small eval sets: one label per distinct point, not a pile of them
            labels.setdefault(points[i], []).append(scored[i].trial_id)
        for point, ids in labels.items():
            text = ", ".join(ids[:2]) + (f" +{len(ids) - 2}" if len(ids) > 2 else "")
            axes.annotate(text, point, textcoords="offset points", xytext=(6, 4), fontsize=8)
    axes.set(xlabel=f"{CLEAN_TR1} (%)", ylabel=f"{robust} (%)", title=f"Clean vs robust: {len(scored)} trials")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def curves_figure(trial: Trial, losses: Sequence[str], evals: Sequence[str]) -> Figure:
    """One trial's per-epoch loss terms, evaluation recall or caption metrics, and (when logged) each weighted term's gradient norm.

    The third panel (``train/gradnorm_*``, issue 14) shows how much of the update each of
    Eq. 6's weighted terms drives, on a log axis: the loss values alone hide that a small
    term (L_CMS) can still move the encoder, or that a large one barely does.
    """
    gradnorms = [train_metric(k) for k in GRADNORM_KEYS if trial.history.get(train_metric(k))]
    panels = [(losses, "training loss terms"), (evals, "")]
    if gradnorms:
        panels.append((gradnorms, "gradient norm of each weighted term (1 batch/epoch)"))
    figure = new_figure(5 * len(panels), 3.4)
    grid = figure.subplots(1, len(panels))
    evaluation = "evaluation caption metrics (x100)" if any(is_caption_metric(k) for k in evals) else "evaluation recall@1 (%)"
    for index, (axes, (keys, title)) in enumerate(zip(grid, panels)):
        history = {k: trial.history[k] for k in keys if trial.history.get(k)}
        if index == 2:  # a zero norm has no place on a log axis: L_SCA's is 0 on epoch 1's first batch (F = F_org there)
            history = {k: [(s, v) for s, v in points if v > 0] for k, points in history.items()}
        drawn = [k for k, points in history.items() if points]
        for key in drawn:
            steps, values = zip(*history[key])
            axes.plot(steps, values, marker="o", ms=3, label=key)
        if not drawn:
            axes.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=axes.transAxes, color="#888")
        elif index != 1 and all(v > 0 for k in drawn for _, v in history[k]):
            axes.set_yscale("log")  # the MAVA terms differ by orders of magnitude; one linear axis flattens the small ones
        axes.set(xlabel=EPOCH, title=title or evaluation)
        epochs = sorted({step for key in drawn for step, _ in history[key]})
        if 0 < len(epochs) <= 12:  # epochs are whole numbers: tick the recorded ones, never 1.5 (nor 1.9 .. 2.1 for one point)
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if drawn:
            axes.legend(fontsize=7, loc="best")
    figure.suptitle(f"trial {trial.trial_id} ({trial.defense}, eps {trial.eps}) run {trial.run_id}", fontsize=9)
    return figure


def numeric(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def params_figure(trials: Sequence[Trial], params: Sequence[str], metric: str, log_params: set[str]) -> Figure:
    """One panel per searched param: its value in each trial against ``metric`` (eps shown in /255 units)."""
    cols = min(4, max(1, len(params)))
    rows = math.ceil(len(params) / cols)
    figure = new_figure(3.3 * cols, 2.9 * rows)
    grid = figure.subplots(rows, cols, squeeze=False)
    styles = group_styles(trials)
    for index, key in enumerate(params):
        axes = grid[index // cols][index % cols]
        values = {t.params.get(key) for t in trials}
        categorical = any(numeric(v) is None for v in values)
        order = sorted(values, key=str)
        for group, style in styles.items():
            members = [t for t in trials if t.group == group and metric in t.metrics and key in t.params]
            xs = [order.index(t.params[key]) if categorical else _scaled(key, numeric(t.params[key])) for t in members]
            if members:
                axes.scatter(xs, [t.metrics[metric] for t in members], color=style["color"], marker=style["marker"], s=30, alpha=0.85)
        if categorical:
            axes.set_xticks(range(len(order)), [str(v) for v in order], fontsize=7)
        elif key in log_params:
            axes.set_xscale("log")
            axes.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide within a decade or two
        axes.set(xlabel="eps (/255)" if key == "eps" else key, ylabel=metric if index % cols == 0 else None)
        axes.grid(alpha=0.3)
    for index in range(len(params), rows * cols):
        grid[index // cols][index % cols].set_visible(False)
    handles = [Line2D([], [], linestyle="", color=s["color"], marker=s["marker"], label=s["label"]) for s in styles.values()]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize=8)
    return figure


def _scaled(key: str, value: float | None) -> float | None:
    # eps is logged as a fraction of the pixel range; the paper (and every label here) speaks in /255.
    return value * 255 if key == "eps" and value is not None else value


def importance_figure(importances: Importances) -> Figure:
    """Horizontal bars, most important parameter on top."""
    ordered = sorted(importances.values.items(), key=lambda kv: kv[1])
    figure = new_figure(6, 0.45 * len(ordered) + 1.4)
    axes = figure.subplots()
    axes.barh([k for k, _ in ordered], [v for _, v in ordered], color="#1f77b4")
    axes.set(xlabel=f"importance for {importances.metric} (sum 1)", title=f"sweep {importances.sweep_id}: {importances.trials} trials")
    axes.set_xlim(0, 1)
    axes.grid(axis="x", alpha=0.3)
    return figure
