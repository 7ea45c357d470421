"""Is configuration A really better than B? The paired bootstrap of their recall difference over the same test images.

    python -m platform.paired --experiment seeds-tiny --a defense=mava --b defense=fare --metric clean/tr1

Each side selects the finished trials of the experiment whose params match every
``key=value`` (``eps`` as the paper writes it, ``4/255``); if they hold several
configurations (e.g. a sweep over ``a``), the one ``platform.compare`` would show is
taken: the best seed-mean of ``--metric``. Both sides' seeds must have uploaded their
final evaluation's ranks (``checkpoint/eval_ranks.parquet``) on the same test images.
Prints the seed-mean difference, its paired percentile bootstrap 95% interval over test
images and the share of bootstrap draws in which A is better
(``trainables/evaluation/uncertainty.py:paired_difference`` says how). Reads MLflow only.
"""

from __future__ import annotations

import argparse
import json

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from platform.cli import run_cli
from platform.compare import check_tracking_store, find_experiment
from platform.seed_spread import RECALL_CELL, configurations, download_ranks, ranks_of_cell, seed_mean
from trainables.errors import UserError
from trainables.evaluation.uncertainty import IR, TR, paired_difference
from trainables.names import CLEAN, EPS_TAG, ROLE_TAG, ROLE_TRIAL, STATUS_FINISHED


def selection(text: str) -> dict[str, str]:
    """``defense=mava,eps=4/255`` -> {"defense": "mava", "eps": "4/255"}."""
    pairs = [part.strip() for part in text.split(",") if part.strip()]
    if not pairs or any("=" not in pair for pair in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: write key=value pairs separated by commas, e.g. defense=mava,eps=4/255")
    return dict(pair.split("=", 1) for pair in pairs)


def _matches(run: Run, wanted: dict[str, str]) -> bool:
    # eps is recorded in pixel units (0.0156...); its tag holds the paper's 4/255, which is what people type.
    values = {**run.data.params, "eps": run.data.tags.get(EPS_TAG, run.data.params.get("eps"))}
    return all(values.get(key) == value for key, value in wanted.items())


def chosen_configuration(runs: list[Run], wanted: dict[str, str], metric: str, side: str) -> list[Run]:
    """The seeds of the best-by-``metric`` configuration among the runs matching ``wanted``."""
    matching = [run for run in runs if _matches(run, wanted)]
    if not matching:
        keys = sorted({key for run in runs for key in run.data.params})
        raise UserError(f"--{side} {wanted}: no finished trial has these params; param names: {', '.join(keys)}")
    scored = [c for c in configurations(matching) if seed_mean(c, metric) is not None]
    if not scored:
        raise UserError(f"--{side} {wanted}: its trials did not record {metric}: choose a --metric they have")
    return max(scored, key=lambda configuration: seed_mean(configuration, metric))


def compare_pair(client: MlflowClient, experiment: str, a: dict[str, str], b: dict[str, str], metric: str) -> dict:
    """The difference A - B of ``metric`` (a recall cell such as ``clean/tr1`` or ``pgd/eps4/ir1``) with its interval."""
    cell = RECALL_CELL.match(metric)
    if cell is None:
        raise UserError(f"--metric {metric!r}: a recall cell is needed, e.g. clean/tr1 or pgd/eps4/ir1 (its ranks were stored)")
    found = find_experiment(client, experiment)
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_TRIAL}' and attributes.status = '{STATUS_FINISHED}'")
    sides = {"a": chosen_configuration(runs, a, metric, "a"), "b": chosen_configuration(runs, b, metric, "b")}
    if {run.info.run_id for run in sides["a"]} & {run.info.run_id for run in sides["b"]}:
        raise UserError(f"--a {a} and --b {b} select the same trials: add a key=value that tells them apart")
    attack, eps_255 = (CLEAN, None) if cell["unattacked"] else (cell["attack"], float(cell["eps"]))
    per_side = {}
    for side, configuration in sides.items():
        ranks = []
        for run in configuration:
            stored = download_ranks(client, run)
            query = ranks_of_cell(stored, attack, eps_255) if stored is not None else None
            if query is None:
                raise UserError(f"run {run.info.run_id} (--{side}) has no stored ranks for {metric}: its final evaluation must "
                                "have run with that attack and eps (trials record checkpoint/eval_ranks.parquet since issue 14)")
            ranks.append(query)
        per_side[side] = ranks
    try:
        result = paired_difference(per_side["a"], per_side["b"], TR if cell["direction"] == "tr" else IR, int(cell["k"]))
    except ValueError as error:
        raise UserError(f"{metric}: {error}") from None
    return {"metric": metric, "test_images": len(per_side["a"][0].image_ranks),
            "a": {"select": a, "seeds": len(sides["a"]), "mean": seed_mean(sides["a"], metric)},
            "b": {"select": b, "seeds": len(sides["b"]), "mean": seed_mean(sides["b"], metric)},
            "difference": result.difference, "interval_95": list(result.interval), "share_a_better": result.share_a_better}


def describe(result: dict) -> str:
    a, b = result["a"], result["b"]
    low, high = result["interval_95"]
    verdict = ("A is better" if low > 0 else "B is better" if high < 0
               else "no reliable difference: the interval contains 0")
    return (f"{result['metric']}: A {a['select']} = {a['mean']:.1f} ({a['seeds']} seed(s)), "
            f"B {b['select']} = {b['mean']:.1f} ({b['seeds']} seed(s))\n"
            f"A - B = {result['difference']:+.1f} points, paired bootstrap 95% [{low:+.1f}, {high:+.1f}] over "
            f"{result['test_images']} test images; A better in {100 * result['share_a_better']:.1f}% of draws: {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m platform.paired", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment of the sweep file)")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: the embedded store)")
    parser.add_argument("--a", type=selection, required=True, help="params of configuration A, e.g. defense=mava or defense=mava,eps=4/255")
    parser.add_argument("--b", type=selection, required=True, help="params of configuration B, e.g. defense=fare")
    parser.add_argument("--metric", default=f"{CLEAN}/tr1", help="the recall cell to compare (default clean/tr1; e.g. pgd/eps4/tr1)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    check_tracking_store(args.tracking_uri)
    result = compare_pair(MlflowClient(args.tracking_uri), args.experiment, args.a, args.b, args.metric)
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
