"""The paper-style table (platform.compare) of retrieval, captioner and mixed experiments, from MLflow records.

The records are written by the sweep's own MLflow tracker fed made-up results
(tests/fake_sweeps.py): no Ray, no training, seconds.
"""

from __future__ import annotations

import csv
import sys

import pytest
from mlflow.tracking import MlflowClient

from dashboards.page import CAPTION_LABELS
from fake_sweeps import CAPTIONER, RETRIEVER
from platform import compare
from platform.compare import caption_columns, comparison_rows, markdown, recall_columns
from platform.tracking import SWEEP_TAG, TRIAL_TAG
from trainables.errors import UserError
from trainables.names import CAPTION_KEYS

TEXT = ["model", "defense", "eps", "trials", "seeds"]
RECALL = ["clean/tr1", "clean/ir1", "pgd/eps4/tr1", "pgd/eps4/ir1"]


def trial_of(client: MlflowClient, run_id: str) -> str:
    """The trial id of a row's run (``c2``), as the sweep tagged it."""
    return client.get_run(run_id).data.tags[TRIAL_TAG]


def rows_by_group(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["model"], row["eps"]): row for row in rows}


def test_caption_columns_are_the_papers_in_order_then_each_attack_and_eps():
    names = {"clean/bleu1", "clean/bleu4", "clean/cider", "clean/rouge_l", "pgd/eps2/cider", "pgd/eps2/bleu4",
             "apgd/eps4/cider", "train/l_sca", "epoch", "clean/tr1"}
    assert caption_columns(names) == ["clean/bleu4", "clean/rouge_l", "clean/cider", "apgd/eps4/cider", "pgd/eps2/bleu4", "pgd/eps2/cider"]
    assert recall_columns(names) == ["clean/tr1"]  # neither kind takes the other's columns
    assert caption_columns({"clean/meteor", "clean/spice", "clean/cider"}) == ["clean/meteor", "clean/cider", "clean/spice"]


def test_every_caption_metric_has_a_column_label():
    assert set(CAPTION_LABELS) == set(CAPTION_KEYS)


def test_a_retrieval_experiment_keeps_its_columns_and_its_robust_ranking(fake_sweeps_store):
    columns, rows = comparison_rows(MlflowClient(fake_sweeps_store), "retrieval")
    assert columns == [*TEXT, *RECALL, "run_id"]
    assert len(rows) == 1 and rows[0]["trials"] == 3
    assert trial_of(MlflowClient(fake_sweeps_store), rows[0]["run_id"]) == "r2"  # the last robust TR@1 column, not clean TR@1 (r1)
    assert rows[0]["pgd/eps4/tr1"] == 15.0


def test_a_captioner_experiment_shows_caption_metrics_and_ranks_by_cider(fake_sweeps_store):
    client = MlflowClient(fake_sweeps_store)
    columns, rows = comparison_rows(client, "captions")
    # METEOR only where Java scored it (trial c4), BLEU-1..3 left in MLflow, no recall column.
    assert columns == [*TEXT, "clean/bleu4", "clean/meteor", "clean/rouge_l", "clean/cider", "run_id"]
    groups = rows_by_group(rows)
    assert set(groups) == {(CAPTIONER, "2/255"), (CAPTIONER, "4/255")}
    eps2, eps4 = groups[(CAPTIONER, "2/255")], groups[(CAPTIONER, "4/255")]
    assert eps2["trials"] == 3 and trial_of(client, eps2["run_id"]) == "c2"
    assert (eps2["clean/cider"], eps2["clean/bleu4"], eps2["clean/meteor"]) == (80.0, 10.0, None)
    assert eps4["clean/meteor"] == 22.0
    _, by_bleu = comparison_rows(client, "captions", rank_by="clean/bleu4")
    assert trial_of(client, rows_by_group(by_bleu)[(CAPTIONER, "2/255")]["run_id"]) == "c1"


def test_a_mixed_experiment_has_the_union_of_columns_and_ranks_each_kind_by_its_own_metric(fake_sweeps_store):
    client = MlflowClient(fake_sweeps_store)
    columns, rows = comparison_rows(client, "mixed")
    assert columns == [*TEXT, *RECALL, "clean/bleu4", "clean/meteor", "clean/rouge_l", "clean/cider", "run_id"]
    groups = rows_by_group(rows)
    retrieval, captioner = groups[(RETRIEVER, "4/255")], groups[(CAPTIONER, "2/255")]
    assert trial_of(client, retrieval["run_id"]) == "r2" and trial_of(client, captioner["run_id"]) == "c2"
    assert client.get_run(captioner["run_id"]).data.tags[SWEEP_TAG] == "mixed-cap-1"
    assert retrieval["clean/cider"] is None and captioner["clean/tr1"] is None
    # Either kind's --rank-by leaves the other kind's rows on their own default.
    for rank_by in ("pgd/eps4/tr1", "clean/cider"):
        _, ranked = comparison_rows(client, "mixed", rank_by=rank_by)
        assert [trial_of(client, rows_by_group(ranked)[g]["run_id"]) for g in ((RETRIEVER, "4/255"), (CAPTIONER, "2/255"))] == ["r2", "c2"]
    table = markdown(columns, rows).splitlines()
    assert table[0].startswith("| model | defense | eps | trials | seeds | clean/tr1 |") and "clean/cider" in table[0]
    retrieval_line = next(line for line in table if line.startswith(f"| {RETRIEVER} |"))
    assert retrieval_line.split(" | ")[len(TEXT) + len(RECALL):-1] == ["-", "-", "-", "-"]  # no caption cells


def test_the_command_line_writes_a_captioner_table(fake_sweeps_store, tmp_path, monkeypatch, capsys):
    out_csv, out_md = tmp_path / "t.csv", tmp_path / "t.md"
    monkeypatch.setattr(sys, "argv", ["platform.compare", "--experiment", "captions", "--tracking-uri", fake_sweeps_store,
                                      "--csv", str(out_csv), "--markdown", str(out_md)])
    assert compare.main() == 0
    printed = capsys.readouterr().out
    assert printed.strip() == out_md.read_text().strip()
    assert "| 80.0 |" in printed and "| 22.0 |" in printed  # CIDEr of c2, METEOR of c4
    with open(out_csv, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert sorted(float(row["clean/cider"]) for row in table) == [50.0, 80.0]


@pytest.mark.parametrize("experiment", ["captions", "mixed"])
def test_every_caption_cell_is_the_value_mlflow_holds(fake_sweeps_store, experiment):
    client = MlflowClient(fake_sweeps_store)
    columns, rows = comparison_rows(client, experiment)
    for row in rows:
        metrics = client.get_run(row["run_id"]).data.metrics
        assert {c: row[c] for c in columns if c in metrics} == {c: metrics[c] for c in columns if c in metrics}
        assert all(row[c] is None for c in columns if "/" in c and c not in metrics)


def test_seeds_are_averaged_per_configuration_with_their_spread_and_an_image_bootstrap(fake_sweeps_store):
    client = MlflowClient(fake_sweeps_store)
    columns, rows = comparison_rows(client, "seeds")
    assert columns == [*TEXT, *RECALL, "run_id"]
    by_defense = {row["defense"]: row for row in rows}
    mava, fare = by_defense["mava"], by_defense["fare"]
    # MAVA: the 1-seed configuration (25.0) beats the 2-seed one's mean (22.5) though s2 alone holds 30.0.
    assert (mava["trials"], mava["seeds"], trial_of(client, mava["run_id"])) == (3, 1, "s3")
    assert mava["pgd/eps4/tr1"] == 25.0 and mava["spread"]["pgd/eps4/tr1"].std is None
    # FARE: two seeds, clean TR@1 40 and 30: mean 35, sample std sqrt(50).
    assert (fare["seeds"], fare["clean/tr1"], fare["pgd/eps4/tr1"]) == (2, 35.0, 20.0)
    spread = fare["spread"]["clean/tr1"]
    assert spread.seeds == 2 and spread.std == pytest.approx(50 ** 0.5)
    low, high = spread.interval
    assert low < 35.0 < high and high - low < 60  # the seed-mean's interval over 20 resampled images
    assert fare["spread"]["clean/ir1"].interval[0] < 30.0 < fare["spread"]["clean/ir1"].interval[1]
    again = {row["defense"]: row for row in comparison_rows(client, "seeds")[1]}
    assert again["fare"]["spread"]["clean/tr1"].interval == (low, high)  # a fixed bootstrap seed
    line = next(line for line in markdown(columns, rows).splitlines() if "| fare |" in line)
    assert f"| 35.0 ± 7.1 [{low:.1f}, {high:.1f}] |" in line


def test_the_csv_carries_each_cells_std_and_interval(fake_sweeps_store, tmp_path, monkeypatch, capsys):
    out_csv = tmp_path / "seeds.csv"
    monkeypatch.setattr(sys, "argv", ["platform.compare", "--experiment", "seeds", "--tracking-uri", fake_sweeps_store, "--csv", str(out_csv)])
    assert compare.main() == 0
    printed = capsys.readouterr()
    assert "35.0 ± 7.1 [" in printed.out
    assert "Downloading artifacts" not in printed.err + printed.out  # no progress bar per trial's few-kB ranks file
    with open(out_csv, newline="") as handle:
        fare = next(row for row in csv.DictReader(handle) if row["defense"] == "fare")
    assert float(fare["clean/tr1"]) == 35.0 and float(fare["clean/tr1 std"]) == pytest.approx(50 ** 0.5)
    assert float(fare["clean/tr1 ci_low"]) < 35.0 < float(fare["clean/tr1 ci_high"])


def test_the_reports_paper_table_shows_each_cells_spread_and_interval(fake_sweeps_store, tmp_path):
    from dashboards.report import build_report

    client = MlflowClient(fake_sweeps_store)
    html = build_report(client, "seeds", fake_sweeps_store, tmp_path / "r.html").html_path.read_text()
    fare = {row["defense"]: row for row in comparison_rows(client, "seeds")[1]}["fare"]
    low, high = fare["spread"]["clean/tr1"].interval
    assert f'<td data-column="clean/tr1">35.0 ± 7.1 [{low:.1f}, {high:.1f}]</td>' in html
    assert "mean ± standard deviation over the seeds" in html


def test_paired_compares_the_configurations_compare_shows_on_the_same_test_images(fake_sweeps_store, monkeypatch, capsys):
    from fake_sweeps import SEEDS_TRIALS
    from platform import paired
    from trainables.evaluation.uncertainty import TR, paired_difference

    client = MlflowClient(fake_sweeps_store)
    # MAVA's chosen configuration is the table's (lr 1e-3, one seed, robust TR@1 25); FARE's two seeds average 20.
    result = paired.compare_pair(client, "seeds", {"defense": "mava"}, {"defense": "fare"}, "pgd/eps4/tr1")
    assert (result["a"]["seeds"], result["a"]["mean"], result["b"]["seeds"], result["b"]["mean"]) == (1, 25.0, 2, 20.0)
    ranks = {trial.trial_id: trial.ranks[1] for trial in SEEDS_TRIALS}  # [1]: pgd at 4/255
    oracle = paired_difference([ranks["s3"]], [ranks["s4"], ranks["s5"]], TR)
    assert result["difference"] == pytest.approx(5.0) == pytest.approx(oracle.difference)
    assert tuple(result["interval_95"]) == oracle.interval and result["test_images"] == 20
    # A narrower selection picks the other MAVA configuration (two seeds, mean 22.5).
    narrower = paired.compare_pair(client, "seeds", {"defense": "mava", "lr": "0.0001"}, {"defense": "fare"}, "pgd/eps4/tr1")
    assert narrower["a"]["seeds"] == 2 and narrower["difference"] == pytest.approx(2.5)
    for a, b, metric, message in [({"defense": "mava"}, {"defense": "mava"}, "clean/tr1", "select the same trials"),
                                  ({"defense": "tecoa"}, {"defense": "fare"}, "clean/tr1", "no finished trial has these params"),
                                  ({"defense": "mava"}, {"defense": "fare"}, "train/loss", "a recall cell is needed")]:
        with pytest.raises(UserError, match=message):
            paired.compare_pair(client, "seeds", a, b, metric)
    monkeypatch.setattr(sys, "argv", ["platform.paired", "--experiment", "seeds", "--tracking-uri", fake_sweeps_store,
                                      "--a", "defense=mava", "--b", "defense=fare", "--metric", "pgd/eps4/tr1"])
    assert paired.main() == 0
    printed = capsys.readouterr().out
    assert "A - B = +5.0 points, paired bootstrap 95% [" in printed and "over 20 test images" in printed


def test_by_a_param_gives_one_row_per_value_each_the_mean_over_its_seeds(fake_sweeps_store, monkeypatch, capsys):
    client = MlflowClient(fake_sweeps_store)
    columns, rows = comparison_rows(client, "seeds", by="lr")
    assert columns == [*TEXT[:3], "lr", *TEXT[3:], *RECALL, "run_id"]
    points = {(row["defense"], float(row["lr"])): row for row in rows}
    assert set(points) == {("mava", 1e-4), ("mava", 1e-3), ("fare", 1e-4)}
    # MAVA at lr 1e-4 is no longer hidden behind its better 1-seed configuration: s1 and s2's means.
    low_lr = points[("mava", 1e-4)]
    assert (low_lr["trials"], low_lr["seeds"], low_lr["clean/tr1"], low_lr["pgd/eps4/tr1"]) == (2, 2, 55.0, 22.5)
    assert low_lr["spread"]["pgd/eps4/tr1"].std == pytest.approx((2 * 7.5**2) ** 0.5)
    assert points[("mava", 1e-3)]["pgd/eps4/tr1"] == 25.0 and points[("fare", 1e-4)]["seeds"] == 2
    monkeypatch.setattr(sys, "argv", ["platform.compare", "--experiment", "seeds", "--tracking-uri", fake_sweeps_store, "--by", "nonsense"])
    with pytest.raises(UserError, match=r"--by nonsense: no trial of experiment 'seeds' has a param 'nonsense'; its trials' params are .*lr"):
        compare.main()
