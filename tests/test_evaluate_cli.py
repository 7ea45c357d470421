"""``python -m platform.evaluate``: end to end on the embedded default, and one clear message per bad input.

The end-to-end runs are run as users run them (a subprocess in the repository root), so
the ``platform`` package shim, argparse and the exit codes are exercised for real. The bad
inputs go through the same ``run_cli(main)`` in this process: a subprocess each cost 8 s of
imports and tested nothing more (tests/test_bad_input.py checks the terminal of a real one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"attack", "eps", "tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "threat", "text_source"}


def run_evaluate(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform.evaluate", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


def test_evaluate_runs_end_to_end_and_writes_json_rows(tmp_path, pretrained_tiny_clip):
    output = tmp_path / "results.json"
    attacks = ["pgd", "apgd", "co-attack", "sga", "vlp-attack"]
    result = run_evaluate("--model", "tiny-clip", "--data", "synthetic:test,n=8", "--attacks", ",".join(attacks),
                          "--eps", "4/255", "--output", str(output), "--no-progress",
                          "--word-candidates", "offline")  # the embedded MLM's path is tested in test_mlm.py
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    assert [(row["attack"], row["eps"]) for row in rows] == [("clean", None)] + [(a, "4/255") for a in attacks]
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert all(0.0 <= row[key] <= 100.0 for key in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10"))
        assert row["threat"] == ("none" if row["attack"] == "clean" else "white-box")
        expected_source = "offline:char+token-embedding" if row["attack"] in ("co-attack", "sga", "vlp-attack") else None
        assert row["text_source"] == expected_source
    # the table: a header with the recall columns and one line per row
    assert "TR@1" in result.stdout and "IR@10" in result.stdout and result.stdout.count("white-box") == len(rows) - 1
    assert "scoring" in result.stdout.splitlines()[0] and all(row["scoring"] == "itc" for row in rows)  # a dual encoder: cosine
    assert "Traceback" not in result.stderr


def test_evaluate_loads_a_checkpoint_and_labels_transfer(tmp_path, pretrained_tiny_clip):
    checkpoint = tmp_path / "epoch-1"
    checkpoint.mkdir()
    save_file({k: v.contiguous() for k, v in pretrained_tiny_clip.vision.state_dict().items()}, str(checkpoint / "vision.safetensors"))
    output = tmp_path / "transfer.json"
    result = run_evaluate("--model", "tiny-clip", "--checkpoint", str(checkpoint), "--surrogate", "tiny-clip",
                          "--data", "synthetic:test,n=8", "--attacks", "pgd", "--eps", "4/255", "--output", str(output), "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    assert [row["threat"] for row in rows] == ["none", "transfer:tiny-clip"]
    assert rows[0]["checkpoint"] == str(checkpoint)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--attacks", "pgd,fgsm"], "unknown attack 'fgsm': use one or more of pgd, apgd"),
        (["--eps", "2/255,5"], "outside (0, 1]"),
        (["--eps", "0"], "outside (0, 1]"),
        (["--surrogate", "tiny-clip@/no/such/surrogate.safetensors"], "does not exist"),
        (["--checkpoint", "/no/such/checkpoint"], "checkpoint /no/such/checkpoint does not exist"),
        (["--model", "no-such-model"], "unknown model kind 'no-such-model'"),
    ],
    ids=["unknown-attack", "eps-too-large", "eps-zero", "missing-surrogate", "missing-checkpoint", "unknown-model"],
)
def test_bad_input_gives_one_clear_message_and_exit_code_2(arguments, message, capsys):
    from platform.cli import run_cli
    from platform.evaluate import main

    defaults = {"--model": "tiny-clip", "--data": "synthetic:test,n=4", "--attacks": "pgd", "--eps": "2/255"}
    given = dict(zip(arguments[::2], arguments[1::2]))
    command = [part for key, value in {**defaults, **given}.items() for part in (key, value)] + ["--no-progress", "--no-checks"]
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: main(command))
    stderr = capsys.readouterr().err
    assert exited.value.code == 2, stderr
    assert message in stderr and stderr.count("error: ") == 1, stderr
