"""``python -m platform.evaluate --task entailment``: rows, table and JSON end to end; one clear message per bad input."""

from __future__ import annotations

import json

import albef_fakes
import pytest
from albef_fakes import write_tiny_albef

from platform.evaluate import main
from trainables.errors import UserError

ROW_KEYS = {"attack", "eps", "acc", "correct", "total", "per_class", "threat", "pairs", "text_source", "warnings", "task", "model"}


@pytest.fixture(scope="module")
def ve_model(tmp_path_factory) -> str:
    return albef_fakes.write_tiny_albef_ve_spec(tmp_path_factory.mktemp("albef-ve-cli"))


def test_entailment_evaluation_writes_rows_and_a_table(ve_model, tmp_path, capsys):
    output = tmp_path / "ve.json"
    assert main(["--task", "entailment", "--model", ve_model, "--data", "synthetic-ve:test,n=6", "--attacks", "pgd,co-attack",
                 "--eps", "2/255", "--word-candidates", "offline", "--pairs", "entailment", "--output", str(output),
                 "--no-progress", "--no-checks"]) == 0  # the honesty checks: tests/test_entailment_eval.py
    result = capsys.readouterr()
    rows = json.loads(output.read_text())
    assert [(row["attack"], row["eps"]) for row in rows] == [("clean", None), ("pgd", "2/255"), ("co-attack", "2/255")]
    for row in rows:
        assert ROW_KEYS <= set(row) and row["pairs"] == "entailment" and row["total"] == 2  # 2 of 6 pairs are entailment
        assert row["per_class"]["entailment"]["total"] == 2 and row["acc"] == pytest.approx(100 * row["correct"] / 2)
    assert [row["threat"] for row in rows] == ["none", "white-box", "white-box"]
    assert rows[2]["text_source"] == "offline:char"
    assert result.out.splitlines()[0].split()[:4] == ["attack", "eps", "acc", "correct"] and result.out.count("white-box") == 2


@pytest.mark.parametrize(("arguments", "message"), [
    (["--data", "synthetic:test,n=4"], "needs entailment pairs, but 'synthetic:test,n=4' is synthetic data"),
    (["--attacks", "apgd"], "apgd do not apply to visual entailment"),
    (["--data", "snli-ve:/no/such/ve_test.json,images=/no/such"], "does not exist"),
], ids=["caption-data", "retrieval-attack", "missing-file"])
def test_bad_entailment_input_is_one_clear_message(ve_model, arguments, message):
    defaults = {"--task": "entailment", "--model": ve_model, "--data": "synthetic-ve:test,n=3", "--attacks": "pgd", "--eps": "2/255"}
    given = dict(zip(arguments[::2], arguments[1::2]))
    with pytest.raises(UserError, match=message):
        main([part for key, value in {**defaults, **given}.items() for part in (key, value)] + ["--no-progress", "--no-checks"])


def test_a_retrieval_checkpoint_is_refused_for_entailment(tmp_path):
    text_dir, checkpoint = write_tiny_albef(tmp_path, variant="retrieval")
    with pytest.raises(UserError, match="no visual-entailment head"):
        main(["--task", "entailment", "--model", f"albef:{text_dir}@{checkpoint}", "--data", "synthetic-ve:test,n=3",
              "--no-progress", "--no-checks"])


def test_finetune_scores_an_entailment_run_before_and_after(ve_model, tmp_path, capsys):
    from platform.finetune import main as finetune

    assert finetune(["--model", ve_model, "--defense", "fare", "--epochs", "1", "--train-data", "synthetic:train,n=4",
                     "--eval-data", "synthetic-ve:test,n=3", "--set", "task=entailment", "--set", "eval_eps=2/255",
                     "--set", "batch_size=4", "--set", "pgd_steps=1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["entailment_keys"] == ["acc"] and results["threat"] == "white-box"
    assert {"clean/acc", "pgd/eps2/acc"} <= set(results["before"]) and {"clean/acc", "pgd/eps2/acc"} <= set(results["after"])
    assert "model | clean ACC | pgd@2/255 ACC" in capsys.readouterr().out
