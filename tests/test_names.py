"""One spelling per name: tags, metric prefixes, artifact names and statuses are written only in trainables/names.py.

The protected strings are read from ``trainables.names`` itself (every module-level
string constant), so a name added there is protected from then on. A literal equal
to one of them anywhere else in the sources fails the test; a prefix (``final/``,
``mava.``) also fails at the start of a literal or an f-string. Docstrings are prose
and are not scanned. Also here: the one seed-derivation helper gives the values of the
formulas it replaced (the embedded default's numbers must not change).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trainables.names as names
from trainables.seeds import EVAL_ATTACK, HONESTY_CHECK, TRAIN_ATTACK, derive_seed

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("trainables", "platform", "dashboards", "benchmarks")
NAMES_FILE = REPO / "trainables" / "names.py"


def protected_names() -> dict[str, str]:
    """value -> constant name, for every module-level string constant of trainables/names.py but its COMMON_WORDS."""
    return {value: key for key, value in vars(names).items()
            if key.isupper() and isinstance(value, str) and value not in names.COMMON_WORDS}


def _is_prefix(value: str) -> bool:
    return value.endswith(("/", "."))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                nodes.add(id(first.value))
    return nodes


def literal_offences(source: str, filename: str, protected: dict[str, str]) -> list[str]:
    """``file:line: 'text' is names.CONSTANT`` for every protected string written as a literal in ``source``."""
    tree = ast.parse(source, filename)
    docstrings = _docstring_nodes(tree)
    prefixes = {value: key for value, key in protected.items() if _is_prefix(value)}
    offences = []
    in_fstring = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = node.values[0].value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings | in_fstring:
            text = node.value
        else:
            continue
        hit = protected.get(text) if isinstance(node, ast.Constant) else None
        hit = hit or next((key for value, key in prefixes.items() if text.startswith(value)), None)
        if hit:
            offences.append(f"{filename}:{node.lineno}: {text!r} is names.{hit}")
    return offences


def test_names_are_spelled_only_in_names_py():
    protected = protected_names()
    offences = []
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path != NAMES_FILE:
                offences += literal_offences(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)), protected)
    assert not offences, "import these from trainables.names instead of writing them:\n" + "\n".join(offences)


def test_the_scan_catches_a_planted_literal_and_skips_prose():
    protected = protected_names()
    planted = 'def f(tags):\n    """Reads the mava.model tag."""\n    return tags["mava.model"], f"final/{tags}", "FINISHED"\n'
    offences = literal_offences(planted, "planted.py", protected)
    assert sorted(o.split(": ", 1)[1] for o in offences) == [
        "'FINISHED' is names.STATUS_FINISHED", "'final/' is names.FINAL_PREFIX", "'mava.model' is names.MODEL_TAG"]


def test_protected_names_cover_tags_prefixes_artifacts_and_statuses():
    protected = protected_names()
    for value in ("mava.model", "mava.defense", "mava.eps", "mava.model_family", "final/", "train/", "checkpoint_path",
                  "vision.safetensors", "card.json", "FINISHED", "FAILED", "base_weights_sha256"):
        assert value in protected


def test_checkpoint_key_is_rays():
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    assert names.CHECKPOINT_PATH_KEY == CHECKPOINT_PATH_KEY


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_seed_helper_gives_the_old_formulas_values(seed):
    """The formulas the loop and the evaluation wrote out before the helper, value for value."""
    for epoch in range(1, 4):
        for rank in range(3):
            assert derive_seed(seed, TRAIN_ATTACK, epoch, rank) == seed * 1_000_003 + epoch * 1_009 + rank
    for batch_index in range(4):
        for run_index in range(5):
            assert derive_seed(seed, EVAL_ATTACK, batch_index, run_index) == seed * 1_000_003 + batch_index * 7919 + run_index
    for index in range(3):
        assert derive_seed(seed, HONESTY_CHECK, index) == seed * 1_000_003 + 104_729 + index


def test_training_streams_use_the_helper():
    """The epoch generator the loop draws attack noise from is seeded by the helper (same draws as before)."""
    import torch

    from trainables.train import epoch_generator

    drawn = torch.rand(4, generator=epoch_generator(3, 2, 1, torch.device("cpu")))
    expected = torch.rand(4, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2 * 1_009 + 1))
    assert torch.equal(drawn, expected)
