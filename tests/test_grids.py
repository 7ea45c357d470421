"""One-parameter grids: which sweeps are one, and the mean ± std over seeds the report draws (hand-computed)."""

from __future__ import annotations

import statistics

import pytest

from dashboards.figures import png_bytes
from dashboards.grids import grid_figure, grid_parameter, grid_rows
from dashboards.records import Sweep, Trial

SPACE = {"N": {"distribution": "choice", "values": [0, 1, 2]}, "seed": {"distribution": "choice", "values": [0, 1]},
         "lr": {"distribution": "fixed", "value": 1e-4}}


def trial(n: int, seed: int, clean: float, attacked: float, status: str = "FINISHED") -> Trial:
    metrics = {"clean/tr1": clean, "clean/ir1": clean - 10, "sga/eps2/tr1": attacked, "sga/eps2/ir1": attacked + 2,
               "pgd/eps2/tr1": attacked / 2}  # pgd without ir1: not a series
    return Trial(run_id=f"r{n}{seed}", run_name="", sweep_id="s", trial_id=f"t{n}{seed}", status=status, model="tiny-clip",
                 defense="mava", eps="2/255", params={"N": str(n), "seed": str(seed), "lr": "0.0001"}, metrics=metrics, checkpoint=None)


def test_a_sweep_varying_one_param_besides_the_seed_is_a_grid():
    trials = [trial(n, s, 50, 10) for n in (0, 1, 2) for s in (0, 1)]
    assert grid_parameter(Sweep("p", "s", SPACE, []), trials) == "N"
    two = {**SPACE, "M": {"distribution": "choice", "values": [1, 2]}}
    varied = [Trial(**{**t.__dict__, "params": {**t.params, "M": str(i % 2)}}) for i, t in enumerate(trials)]
    assert grid_parameter(Sweep("p", "s", two, []), varied) is None  # two params vary: not a one-parameter grid
    assert grid_parameter(Sweep("p", "s", SPACE, []), trials[:1]) is None  # one value: nothing to draw
    with_eps = {**SPACE, "eps": {"distribution": "choice", "values": [2 / 255, 4 / 255]}}
    per_eps = [Trial(**{**t.__dict__, "params": {**t.params, "eps": str((1 + i % 2) * 2 / 255)}}) for i, t in enumerate(trials)]
    assert grid_parameter(Sweep("p", "s", with_eps, []), per_eps) == "N"  # the training eps splits figures, it is not the axis


def test_grid_points_are_the_mean_and_std_over_seeds_of_mean_tr1_ir1():
    trials = [trial(10, 0, 60, 10), trial(10, 1, 62, 14), trial(2, 0, 50, 20), trial(2, 1, 50, 30, status="FAILED")]
    points = {(p.value, p.series): p for p in grid_rows(trials, "N")}
    assert list(dict.fromkeys(v for v, _ in points)) == ["2", "10"]  # numeric order, not "10" < "2"
    assert {s for _, s in points} == {"clean", "sga/eps2"}
    hit = points[("10", "sga/eps2")]
    assert hit.mean == pytest.approx((11 + 15) / 2) and hit.std == pytest.approx(statistics.stdev([11, 15])) and hit.seeds == 2
    single = points[("2", "sga/eps2")]  # the failed seed is left out
    assert single.mean == pytest.approx(21) and single.std is None and single.seeds == 1
    assert points[("10", "clean")].mean == pytest.approx((55 + 57) / 2)


def test_the_grid_figure_draws_one_line_per_attack_with_error_bars():
    trials = [trial(n, s, 50 + n, 10 + n + s) for n in (0, 1, 2) for s in (0, 1)]
    figure = grid_figure(grid_rows(trials, "N"), "N", "ablation-neighbours")
    robust, clean = figure.axes
    assert [t.get_text() for t in robust.get_legend().get_texts()] == ["sga/eps2"]
    assert [t.get_text() for t in robust.get_xticklabels()] == ["0", "1", "2"]
    assert len(robust.collections) == 1  # the error bars of the one robust line
    assert png_bytes(figure).startswith(b"\x89PNG")


def test_the_report_draws_a_grid_sweep_from_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from dashboards.report import build_report
    from fake_sweeps import RETRIEVAL_OPTIONS, FakeSweep, FakeTrial, log_sweep, retrieval_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = {"N": {"distribution": "choice", "values": [1, 2]}, "seed": {"distribution": "choice", "values": [0, 1]}}
    trials = [FakeTrial(f"g{n}{s}", {"N": n, "seed": s}, retrieval_metrics(clean_tr1=40.0 + n, robust_tr1=10.0 * n + s))
              for n in (1, 2) for s in (0, 1)]
    log_sweep(uri, "grid", str(tmp_path / "artifacts"), FakeSweep("grid-1", RETRIEVAL_OPTIONS, space, "pgd/eps4/tr1", trials))
    report = build_report(MlflowClient(uri), "grid", uri, tmp_path / "r.html")
    html = report.html_path.read_text()
    assert "grid-grid-1-eps4-255" in {path.stem for path in report.figure_paths} and "sweep grid-1: N, training eps 4/255" in html
    # N = 2: pgd/eps4 TR@1 20 and 21 over the seeds, IR@1 30 (retrieval_metrics' default): mean (20.5 + 30) / 2
    assert "<td>25.2</td>" in html  # 25.25, printed to one decimal (round half to even)


def test_learning_curves_have_whole_epoch_ticks():
    from dashboards.figures import curves_figure

    trial = Trial(run_id="r", run_name="", sweep_id="s", trial_id="t", status="FINISHED", model="m", defense="mava", eps="2/255",
                  params={}, metrics={}, checkpoint=None, history={"train/loss": [(1, 1.0), (2, 0.5)], "clean/tr1": [(2, 40.0)]})
    figure = curves_figure(trial, ["train/loss"], ["clean/tr1"])
    figure.canvas.draw()
    for axes in figure.axes:
        ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
        assert ticks and all(float(tick).is_integer() for tick in ticks)  # matplotlib's default would put 1.5 between 1 and 2
