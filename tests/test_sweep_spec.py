"""Bad sweep files: each mistake gets one message naming the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import REPO_ROOT
from platform.sweep_spec import load_sweep_spec, parse_sweep_spec
from trainables.errors import UserError
from trainables.models import is_captioner_spec

GOOD = {
    "experiment": {"name": "t", "model": "tiny-clip", "train_data": "synthetic:train,n=16", "eval_data": "synthetic:test,n=8", "eval_eps": ["2/255", "4/255"]},
    "search": {"algorithm": "tpe", "num_trials": 2, "objectives": [{"metric": "pgd/eps4/tr1", "mode": "max"}]},
    "space": {"a": {"distribution": "loguniform", "low": 0.001, "high": 0.1}, "eps": {"distribution": "choice", "values": ["2/255", "4/255"]}},
}


def with_change(path: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


DELETE = object()

MISTAKES = [
    ("experiment.learning_rate", 0.1, r"experiment.learning_rate': unknown key"),
    ("experiment.defense", "madry", r"'defense'.*'mava', 'fare' or 'tecoa'"),
    ("experiment.epochs", 0, r"experiment.epochs'.*greater than or equal to 1"),
    ("experiment.epochs", "ten", r"experiment.epochs'.*valid integer.*'ten'"),
    ("experiment.name", "my sweep!", r"experiment.name'.*pattern"),
    ("experiment.eval_eps", ["5/0"], r"not a number or a fraction"),
    ("experiment.model", "vit-xyz", None),  # checked when the sweep starts (parse_model_spec), see test below
    ("search.algorithm", "bayes", r"search.algorithm'.*'tpe', 'nsga2' or 'grid'"),
    ("search.num_trials", DELETE, r"num_trials is required"),
    ("search.objectives", [], r"search.objectives'.*at least 1"),
    ("search.objectives", [{"metric": "pgd/eps8/tr1"}], r"'pgd/eps8/tr1' is not produced.*valid: clean/tr1"),
    ("search.objectives", [{"metric": "clean/tr1", "mode": "up"}], r"mode'.*'max' or 'min'"),
    ("search.scheduler", {"type": "asha"}, None),
    ("search.initial_points", [{"zeta": 1}], r"initial_points\[0\]: keys \['zeta'\] are not in space"),
    ("space.a", {"distribution": "loguniform", "low": 0.1, "high": 0.01}, r"space: key 'a': low \(0.1\) must be below high \(0.01\)"),
    ("space.a", {"distribution": "loguniform", "low": -1, "high": 0.01}, r"space.a.loguniform.low'.*greater than 0"),
    ("space.a", {"distribution": "gaussian", "mu": 0}, r"space.a'.*does not match any of the expected tags.*'uniform', 'loguniform', 'int', 'choice', 'fixed'"),
    ("space.eps", {"distribution": "choice", "values": ["2/255", 3]}, r"eps .*3.*outside \(0, 1\]"),
    ("space.N", {"distribution": "int", "low": -1, "high": 3}, r"space: key 'N' value -1: .*greater than or equal to 1"),
    ("space.M", {"distribution": "uniform", "low": 1, "high": 5}, r"key 'M' takes integers"),
    ("space.beta_gamma", {"distribution": "uniform", "low": 0, "high": 1}, r"key 'beta_gamma' is not a searchable training option; searchable: .*a, b, c"),
    ("space.defense", {"distribution": "choice", "values": ["mava", "dp"]}, r"space: key 'defense' value 'dp'"),
    ("space.lr", {"distribution": "choice", "values": []}, r"space.lr.choice.values'.*at least 1"),
    ("tracking.url", "http://x", r"tracking.url': unknown key"),
    ("resources.workers_per_trial", 0, r"resources.workers_per_trial'.*greater than or equal to 1"),
]


@pytest.mark.parametrize("path, value, message", [m for m in MISTAKES if m[2]], ids=[f"{m[0]}={m[1]!r}"[:60] for m in MISTAKES if m[2]])
def test_each_mistake_gets_its_own_clear_message(path, value, message):
    with pytest.raises(UserError, match=message):
        parse_sweep_spec(with_change(path, value), "sweep.yaml")


def test_asha_needs_a_single_objective():
    data = with_change("search.scheduler", {"type": "asha"})
    data["search"]["objectives"].append({"metric": "clean/tr1"})
    with pytest.raises(UserError, match="ASHA.*single objective"):
        parse_sweep_spec(data, "sweep.yaml")


def test_grid_needs_choices():
    with pytest.raises(UserError, match="grid search needs choice or fixed values"):
        parse_sweep_spec(with_change("search.algorithm", "grid"), "sweep.yaml")


def test_eps_is_accepted_as_a_fraction_everywhere():
    spec = parse_sweep_spec(GOOD, "sweep.yaml")
    assert spec.space["eps"].values == [2 / 255, 4 / 255]
    assert spec.experiment.eval_eps == [2 / 255, 4 / 255]


def test_syntax_errors_and_missing_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("experiment:\n  name: x\n   model: [\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+, column \d+"):
        load_sweep_spec(broken)
    with pytest.raises(UserError, match="does not exist.*search_spaces/abc.yaml"):
        load_sweep_spec(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(UserError, match="experiment'.*Field required"):
        load_sweep_spec(empty)


def test_shipped_sweep_files_are_valid():
    for path in sorted((REPO_ROOT / "search_spaces").glob("*.yaml")):
        # A captioner preset keeps its model kind (its objective is a caption metric); validation reads no model file.
        model = {} if is_captioner_spec(yaml.safe_load(path.read_text())["experiment"]["model"]) else {"experiment.model": "tiny-clip"}
        load_sweep_spec(path, {**model, "experiment.train_data": "synthetic:train", "experiment.eval_data": "synthetic:test"})


def test_the_command_line_prints_one_message_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(yaml.safe_dump(with_change("search.algorithm", "bayes"))))
    result = subprocess.run([sys.executable, "-m", "platform.sweep", "--space", str(bad)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "search.algorithm" in result.stderr and "Traceback" not in result.stderr
